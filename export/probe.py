"""The self-check's probe, measured on the exporting machine and stored in the bundle
(runtime/selfcheck.py says what it is and how `verify --run` and `serve` compare with it).

It runs through the runtime's own Model on the freshly written files, on the CPU, so the numbers
are what a runtime computes, not what transformers would.
"""

from __future__ import annotations

import json
from pathlib import Path

from medgemma_edge.runtime import selfcheck
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.manifest import file_entry
from medgemma_edge.runtime.model import Model
from medgemma_edge.runtime.preprocess import DEFAULT_FIT


def probe_bundle(bundle: Path, manifest: dict, threads: int | None = None) -> dict:
    """The probe of a freshly written bundle (manifest not yet on disk): the text prompt once, and
    per vision file this CPU runs faithfully its image embedding and picture prompt. A file it
    cannot run (onnx-int8-vnni without VNNI) is left out: it is recorded at its first run elsewhere."""
    probe = {"text": None, "vision": {}}
    for vq in [f["quant"] for f in manifest["files"] if f["role"] == "vision"]:
        part = _measure(bundle, manifest, threads, vq)
        if part is not None:
            probe["text"] = probe["text"] or part["text"]
            probe["vision"].update(part["vision"])
    if probe["text"] is None:  # text-only, or no vision file runs on this CPU
        probe["text"] = _measure(bundle, manifest, threads, "auto")["text"]
    return selfcheck.stamp(probe)


def _measure(bundle, manifest: dict, threads, vision: str) -> dict | None:
    try:
        model = Model(Path(bundle), manifest, device="cpu", threads=threads, context=None, fit=DEFAULT_FIT,
                      vision=vision)
    except InputError:  # a named vision file this CPU cannot run faithfully
        return None
    try:
        return selfcheck.measure(model).probe()
    finally:
        if model.vision_path is not None:
            model.load_vision().close()
        model.engine.close()


def add_probe(bundle: Path, manifest: dict, threads: int | None = None) -> dict:
    """Measure the probe, write it as the bundle's selfcheck.json and list it in `manifest`
    (under "selfcheck", not among "files": runtimes older than the probe still load the bundle)."""
    path = Path(bundle) / selfcheck.PROBE_FILE
    path.write_text(json.dumps(probe_bundle(bundle, manifest, threads), indent=1) + "\n", encoding="utf-8")
    entry = file_entry(bundle, "selfcheck", selfcheck.PROBE_FILE)
    manifest["selfcheck"] = {k: entry[k] for k in ("path", "size", "sha256")}
    return manifest

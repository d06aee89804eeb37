"""Bundles exported with our own tool (export.bundle.export_gguf / export_onnx, as `medgemma-edge export`), cached
next to the checkpoint they come from and rebuilt when the checkpoint's config or the tool changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

from benchmarks.backends import say
from medgemma_edge.runtime.cache import cache_root

STAMP = ".bench-stamp"


def code_digest(source: str) -> str:
    """What a Python file does, without its comments and docstrings (prose edits keep caches)."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def export_digest() -> str:
    """A digest of the export code (every export/*.py): a cached file made by other code is stale
    (the version number does not move with each change to a graph or a quantizer)."""
    import medgemma_edge.export as export

    h = hashlib.sha256()
    for path in sorted(Path(export.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + code_digest(path.read_text(encoding="utf-8")).encode())
    return h.hexdigest()[:16]


def _stamp(src: Path, quant: str, vision_quant: str) -> str:
    from medgemma_edge.runtime import __version__

    config = hashlib.sha256((src / "config.json").read_bytes()).hexdigest()[:16]
    weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in src.glob("*.safetensors"))
    return json.dumps({"config": config, "weights": weights, "quant": quant, "vision": vision_quant,
                       "tool": __version__, "export": export_digest()})


DEFAULT = "default"  # vision_quant: every file of export's default (export.quants.DEFAULT_VISION_QUANTS)


def bundle(src: Path, quant: str, vision_quant: str = "f16", threads: int = 0, quality=False) -> Path:
    """The bundle of `src` at `quant` (text) / `vision_quant` (one encoding, or DEFAULT), exported on
    first use. quality="vision": measure the vision files' fidelity (what load(vision="auto") reads)."""
    from medgemma_edge.export.bundle import export_gguf
    from medgemma_edge.export.quants import DEFAULT_VISION_QUANTS

    quants = DEFAULT_VISION_QUANTS if vision_quant == DEFAULT else (vision_quant,)
    out = cache_root() / "bench" / "bundles" / f"{src.name}-{quant}-{vision_quant}"
    stamp = _stamp(src, quant, "+".join(quants) + (f" quality={quality}" if quality else ""))
    return _cached(out, stamp, f"{src.name} -> {quant} + vision {vision_quant}",
                   lambda: export_gguf(src, out, quant, quants, quality=quality, threads=threads, overwrite=True))


def onnx_bundle(src: Path, quant: str, vision_quant: str = "onnx-int8", threads: int = 0) -> Path:
    """The ONNX bundle of `src` (decoder `quant`: int8 / int4 / fp32, one vision file), exported on
    first use with export.bundle_onnx.export_onnx (as `medgemma-edge export --format onnx`), no
    quality report (the report's fp32 reference of a 4B decoder is 15.5 GB)."""
    from medgemma_edge.export.bundle_onnx import export_onnx

    out = cache_root() / "bench" / "bundles" / f"{src.name}-onnx-{quant}-{vision_quant}"
    stamp = _stamp(src, f"onnx-{quant}", vision_quant)
    return _cached(out, stamp, f"{src.name} -> ONNX {quant} + vision {vision_quant}",
                   lambda: export_onnx(src, out, quant, vision_quant, quality=False, threads=threads, overwrite=True))


def _cached(out: Path, stamp: str, what: str, export) -> Path:
    """`out`, exported by `export()` unless its stamp says it is already this bundle."""
    if (out / STAMP).is_file() and (out / STAMP).read_text() == stamp:
        return out
    say(f"[export] {what} (cached in {out}) ...")
    t0 = time.perf_counter()
    res = export()
    (out / STAMP).write_text(stamp)
    say(f"[export] done in {time.perf_counter() - t0:.0f} s, peak {max(res.peak_mb.values(), default=0):,.0f} MB")
    return out


def files(bundle_dir: Path) -> dict[str, Path]:
    """role ('text', 'vision': the first vision file, the bundle's primary) -> path, from the manifest."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    out = {}
    for f in manifest["files"]:
        out.setdefault(f["role"], bundle_dir / f["path"])
    return out


def model_files(bundle_dir: Path) -> list[Path]:
    """The text file and every vision file of a bundle: what a load may read (vision="auto" opens
    whichever of its vision files this CPU runs best, not necessarily the first)."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    return [bundle_dir / f["path"] for f in manifest["files"] if f["role"] in ("text", "vision")]


def vision_quants(bundle_dir: Path) -> list[str]:
    """The encodings of the bundle's vision files, in manifest order."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    return [f.get("quant") for f in manifest["files"] if f["role"] == "vision"]


def warm(paths) -> None:
    """Read files once so every backend loads from the page cache (loads are measured warm)."""
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def verified(bundle_dir: Path) -> None:
    """Hash the bundle's files once, as the runtime's first load does (and remembers in the cache
    folder), so that measured loads are the usual ones, not the first after an export."""
    from medgemma_edge.runtime.manifest import verify_bundle
    from medgemma_edge.runtime.model import VERIFIED_FILES

    verify_bundle(bundle_dir, remember=cache_root() / VERIFIED_FILES)


if __name__ == "__main__":  # python -m benchmarks.bundles  → exports the 4B bundles
    from benchmarks.checkpoint4b import build_4b

    for q in ("q4_k_m", "q8_0"):
        print(bundle(build_4b(), q))

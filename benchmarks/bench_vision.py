"""Which CPU path encodes an image fastest, and how far each lands from F32: the vision-encoder table.

    python -m benchmarks.bench_vision [--quick] [--threads N] [--skip NAME ...]

Every variant of the same vision tower (the MedGemma-4B-shaped checkpoint, or `tiny` with --quick)
encodes the same 896² X-ray, one after another in this process: llama.cpp's mtmd with the mmproj
at F32 / F16 / BF16 / Q8_0, flash attention on and off, and onnxruntime with the tower at f32,
int8 (unsigned 8-bit weights) and, on CPUs with VNNI only, int8-vnni (signed 8-bit weights; it overflows
elsewhere, so the runtime never runs it there) and int8-vnni-attn (those weights, int8 attention;
benchmarks/bench_encoder.py times it against int8-vnni in alternating rounds). BF16 runs everywhere but is only fast with
avx512_bf16; the table says when this CPU lacks it. Fidelity is the cosine (whole output and
worst token row) and the worst relative difference of the image embeddings against the F32
mmproj without flash attention, the reference. Files are exported once into the cache
(bench/vision/) with our own exporter; the ONNX files all come from one traced graph.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.backends import say
from medgemma_edge.runtime.cache import cache_root

# (name, vision file type, flash attention for mtmd: 1 on, 0 off, None for onnx)
VARIANTS = [
    ("mmproj f32, flash attn off (reference)", "f32", 0),
    ("mmproj f16, flash attn off", "f16", 0),
    ("mmproj f16, flash attn on (runtime default)", "f16", 1),
    ("mmproj bf16, flash attn on", "bf16", 1),
    ("mmproj q8_0, flash attn on", "q8_0", 1),
    ("onnx f32", "onnx-f32", None),
    ("onnx int8 (u8 weights)", "onnx-int8", None),
    ("onnx int8-vnni (8-bit weights)", "onnx-int8-vnni", None),
    ("onnx int8-vnni-attn (8-bit weights, int8 attention)", "onnx-int8-vnni-attn", None),
]


def vision_file(plan, folder: Path, quant: str) -> Path:
    """The vision file `quant` of `plan` in `folder`, exported there unless the one there was made
    by the same export code (the stamp beside it)."""
    from benchmarks.bundles import export_digest
    from medgemma_edge.export.onnx_vision import INT8_ATTENTION, int8_attention_file

    digest = export_digest()

    def fresh(path: Path) -> bool:
        stamp = path.with_name(path.name + ".stamp")
        return path.is_file() and stamp.is_file() and stamp.read_text() == digest

    path = folder / plan.vision_name(quant)
    if fresh(path):
        return path
    say(f"[vision] exporting {path.name} ...")
    f32, vnni = folder / plan.vision_name("onnx-f32"), folder / plan.vision_name("onnx-int8-vnni")
    if quant.startswith("onnx-") and quant != "onnx-f32" and plan.onnx_traced is None and fresh(f32):
        plan.onnx_traced = f32  # the traced graph itself
    tmp = path.with_name(path.name + ".part" + path.suffix)
    if quant == INT8_ATTENTION and fresh(vnni):
        shutil.copyfile(vnni, tmp)  # the same 8-bit weights: the export's own rewrite, no second quantization
        int8_attention_file(tmp)
    else:
        plan.write_vision(tmp, quant, scratch=folder)
    tmp.replace(path)
    path.with_name(path.name + ".stamp").write_text(digest)
    return path


def runnable(quant: str, flags: set[str]) -> str | None:
    """Why this CPU skips or slows a variant: None when it runs as intended."""
    from medgemma_edge.runtime.vision_choice import NEEDS, cpu_kind

    if cpu_kind(flags) not in NEEDS.get(quant, (cpu_kind(flags),)):
        return "skipped: needs VNNI"
    if quant == "bf16" and "avx512_bf16" not in flags:
        return "no avx512_bf16 on this CPU: bf16 widened to f32 in software"
    return None


def main(argv=None) -> int:
    from PIL import Image

    from benchmarks.inputs import write_inputs
    from medgemma_edge.export.bundle import ExportPlan
    from medgemma_edge.runtime.backends import open_vision
    from medgemma_edge.runtime.backends.llama_engine import LlamaEngine
    from medgemma_edge.runtime.machine import physical_cores
    from medgemma_edge.runtime.backends.mtmd import VisionEncoder
    from medgemma_edge.runtime.preprocess import model_view
    from medgemma_edge.runtime.vision_choice import cpu_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny test model instead of the 4B shape")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], help="skip variants whose name contains these words")
    args = p.parse_args(argv)
    threads = args.threads or physical_cores()
    if args.quick:
        from medgemma_edge.testing.models import build_tiny

        ckpt, text_quant = build_tiny(), "q8_0"
    else:
        from benchmarks.checkpoint4b import build_4b

        ckpt, text_quant = build_4b(), "q4_k_m"
    from benchmarks import bundles

    text = bundles.files(bundles.bundle(ckpt, text_quant))["text"]  # mtmd needs the text model's width
    plan = ExportPlan.read(ckpt)
    folder = cache_root() / "bench" / "vision" / ckpt.name
    folder.mkdir(parents=True, exist_ok=True)
    inputs = write_inputs(cache_root() / "bench" / "inputs", ct_slices=8)
    pixels = model_view([np.asarray(Image.open(inputs.png).convert("RGB"))], plan.vision.image_size, "pad")[0]
    engine = LlamaEngine(str(text), n_ctx=512, threads=threads, n_gpu_layers=0)
    image = {"mean": plan.vision.image_mean, "std": plan.vision.image_std}
    rows, ref, notes = [], None, []
    flags = cpu_flags()
    for name, quant, flash in VARIANTS:
        if any(w in name for w in args.skip) and ref is not None:
            continue
        note = runnable(quant, flags)
        if note:
            notes.append(f"{name}: {note}")
            if note.startswith("skipped"):
                continue
        path = vision_file(plan, folder, quant)
        if flash is None:
            enc = open_vision(path, engine.model, engine.n_embd, threads, "cpu", image)
        else:
            enc = VisionEncoder(str(path), engine.model, threads, flash_attn=flash)
        say(f"[vision] {name}: encoding ...")
        t0 = time.perf_counter()
        emb = enc.encode(pixels).astype(np.float64)
        seconds = time.perf_counter() - t0
        enc.close()
        ref = emb if ref is None else ref
        rows.append((name, path.stat().st_size / 1e6, seconds, *_fidelity(emb, ref)))
        say(f"[vision] {name}: {seconds:.1f} s")
    print(f"\nvision encoder, one {pixels.shape[0]}² image, {threads} thread(s), {ckpt.name}\n")
    print("| path | file MB | encode s | speed vs reference | cosine vs F32 | worst row cosine | worst rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for name, mb, s, cos, row, rel in rows:
        print(f"| {name} | {mb:,.0f} | {s:.1f} | {rows[0][2] / s:.2f}× | {cos:.6f} | {row:.6f} | {rel:.2e} |")
    for note in notes:
        print(f"\n- {note}")
    return 0


def _fidelity(emb: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    cos = float((emb * ref).sum() / np.linalg.norm(emb) / np.linalg.norm(ref))
    rows = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    return cos, float(rows.min()), float(np.abs(emb - ref).max() / np.abs(ref).max())


if __name__ == "__main__":
    raise SystemExit(main())

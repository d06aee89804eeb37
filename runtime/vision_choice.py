"""Which of a bundle's vision files to run: `load(vision="auto")` picks the fastest faithful one.

A bundle may carry several encodings of the same vision tower (export `--vision-quant` repeated):
an f16 mmproj for llama.cpp, an int8 ONNX graph for onnxruntime, … Faithful means the export's
quality report measured it within FIDELITY_MIN cosine of the f32 tower on its image embeddings
(the f32 and onnx-f32 files are the reference arithmetic itself). Among the faithful ones:
- where this machine has timed every candidate (runtime/budget.EncodeSpeed, per file and thread
  count), the fastest measured (each path's best encode: one that ran beside other work, slow,
  must not hide the path for good);
- else the ranking measured at MedGemma 4B shape on 2 threads for this CPU's kind (SPEED_RANK).
"""

from __future__ import annotations

from pathlib import Path

from medgemma_edge.runtime.errors import InputError

FIDELITY_MIN = 0.999
EXACT = ("f32", "onnx-f32")  # the reference arithmetic: no fidelity to measure

# Encode seconds measured at 4B shape, 2 threads (export/quants.py; benchmarks/results/REPORT.md):
# AVX-512 VNNI EPYC: onnx-int8-vnni 22.9, onnx-int8 25.3, onnx-f32 39.7, f16 50.9-63.9 (llama.cpp's
# own path 85.6); AVX2 EPYC: onnx-int8 38-40, f16 52.8-55, onnx-f32 54, q8_0 72, f32 127.
# int8 ONNX leads on both (VNNI's int8 dot products widen the gap); a GPU runs llama.cpp's f16
# (or onnxruntime's CUDA provider on the float graph), never the CPU's int8 kernels.
# bf16 (an mmproj with BF16 matrices): ahead of f16 where the CPU has avx512_bf16 (ggml's
# vdpbf16ps dot products; bench_vision on the VNNI EPYC, flash attention on, a busy machine:
# bf16 94 s vs f16 149 s, cosine 0.999999 vs f32), last where it has not (every weight widened
# in software). Still behind every int8 ONNX file (22 s in the same run).
SPEED_RANK = {
    "vnni": ("onnx-int8-vnni", "onnx-int8", "onnx-f32", "bf16", "f16", "q8_0", "f32"),
    "avx2": ("onnx-int8", "f16", "onnx-f32", "bf16", "q8_0", "f32"),
    "other": ("f16", "bf16", "onnx-f32", "onnx-int8", "q8_0", "f32"),  # no measurement: float kernels first
    "gpu": ("f16", "bf16", "f32", "onnx-f32", "q8_0", "onnx-int8"),
}
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # CPUs whose matmuls take bf16 natively


# Encodings a kind of CPU cannot run faithfully, whatever the export measured on its own machine:
# full 8-bit weights overflow AVX2's saturating int16 pair sums (tiny's cosine fell to 0.98).
NEEDS = {"onnx-int8-vnni": ("vnni",)}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_kind(flags: set[str], gpu: bool = False) -> str:
    if gpu:
        return "gpu"
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "vnni"
    return "avx2" if "avx2" in flags else "other"


def quant_of(entry: dict) -> str:
    """The encoding of a vision file entry (older manifests name it only in the file name)."""
    if entry.get("quant"):
        return entry["quant"]
    name = entry["path"]
    if name.endswith(".onnx"):
        return "onnx-int8-vnni" if "int8-vnni" in name else "onnx-int8" if "int8" in name else "onnx-f32"
    return next((q for q in ("f32", "f16", "bf16", "q8_0") if name.endswith(f"-{q}.gguf")), "f16")


def faithful(entry: dict) -> bool:
    quant = quant_of(entry)
    return quant in EXACT or (entry.get("fidelity") is not None and entry["fidelity"] >= FIDELITY_MIN)


def choose_vision(entries: list[dict], want: str = "auto", *, flags: set[str] | None = None, gpu: bool = False,
                  measured=None) -> dict | None:
    """The vision file entry to run. `want`: "auto", or an encoding the bundle holds (f16, onnx-int8, …).
    `measured(entry) -> seconds | None` gives this machine's encode time when known."""
    if not entries:
        return None
    if want != "auto":
        for e in entries:
            if quant_of(e) == want:
                return e
        have = ", ".join(quant_of(e) for e in entries)
        raise InputError(f"this bundle has no {want!r} vision file (it has {have}) — pick one of those, or auto")
    flags = cpu_flags() if flags is None else flags
    kind = cpu_kind(flags, gpu)
    runnable = [e for e in entries if kind in NEEDS.get(quant_of(e), (kind,))]
    pool = [e for e in runnable if faithful(e)] or runnable[:1] or entries[:1]  # else the primary (first)
    if measured is not None:
        times = {id(e): measured(e) for e in pool}
        if all(t is not None for t in times.values()):
            return min(pool, key=lambda e: times[id(e)])
    rank = SPEED_RANK[kind]
    if kind != "gpu" and not flags & BF16_FLAGS:
        rank = tuple(q for q in rank if q != "bf16") + ("bf16",)
    return min(pool, key=lambda e: rank.index(quant_of(e)) if quant_of(e) in rank else len(rank))

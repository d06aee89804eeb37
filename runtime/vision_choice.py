"""Which of a bundle's vision files to run: `load(vision="auto")` picks the fastest faithful one.

A bundle may carry several encodings of the same vision tower (export `--vision-quant` repeated):
an f16 mmproj for llama.cpp, an int8 ONNX graph for onnxruntime, … Faithful means the export's
quality report measured it within FIDELITY_MIN cosine of the f32 tower on its image embeddings
(the f32 and onnx-f32 files are the reference arithmetic itself). That report was measured on the
machine that ran the export, whose CPU the manifest records (`export_machine`, shown by
`medgemma-edge verify`): `auto` trusts it on this machine, except where a kind of CPU is known to
compute a file differently (NEEDS), which no choice, automatic or named, can get past.
Among the faithful files this CPU runs as exported:
- where this machine has timed every candidate (runtime/budget.EncodeSpeed, per file and thread
  count), the fastest measured (each path's best encode: one that ran beside other work, slow,
  must not hide the path for good);
- else the ranking measured at MedGemma 4B shape on 2 threads for this CPU's kind (SPEED_RANK;
  the times are in benchmarks/results/).
"""

from __future__ import annotations

from pathlib import Path

from medgemma_edge.runtime.errors import InputError

FIDELITY_MIN = 0.999
EXACT = ("f32", "onnx-f32")  # the reference arithmetic: no fidelity to measure

# Fastest first, per kind of CPU (benchmarks/results/REPORT.md, bench_vision). int8 ONNX leads on
# x86 (VNNI's int8 dot products widen the gap; with VNNI, int8 attention ahead of int8-vnni's float
# attention: benchmarks/results/ENCODER.md, alternating rounds); a GPU runs llama.cpp's f16 (or onnxruntime's CUDA
# provider on the float graph), never the CPU's int8 kernels. bf16 (an mmproj with BF16 matrices)
# ranks ahead of f16 where the CPU has avx512_bf16 (ggml's vdpbf16ps dot products) and last where
# it has not (every weight widened in software); it stays behind every int8 ONNX file.
SPEED_RANK = {
    "vnni": ("onnx-int8-vnni-attn", "onnx-int8-vnni", "onnx-int8", "onnx-f32", "bf16", "f16", "q8_0", "f32"),
    "avx2": ("onnx-int8", "f16", "onnx-f32", "bf16", "q8_0", "f32"),
    "other": ("f16", "bf16", "onnx-f32", "onnx-int8", "q8_0", "f32"),  # no measurement: float kernels first
    "gpu": ("f16", "bf16", "f32", "onnx-f32", "q8_0", "onnx-int8"),
}
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # CPUs whose matmuls take bf16 natively
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
# The CPU flags the choice reads, recorded in a bundle's manifest by the export that measured it.
SIMD_FLAGS = frozenset({"avx2", "fma", "avx512f"} | VNNI_FLAGS | BF16_FLAGS)

# Encodings a kind of CPU cannot run faithfully, whatever the export measured on its own machine:
# full 8-bit weights overflow AVX2's saturating int16 pair sums. The test is the CPU's own (an
# ONNX graph on a GPU machine may still run int8 operators on the CPU).
# onnx-int8-vnni-attn's int8 attention products (u8 x s8, full range) overflow the same way.
NEEDS = {"onnx-int8-vnni": ("vnni",), "onnx-int8-vnni-attn": ("vnni",)}
REEXPORT = "re-export the bundle with --vision-quant onnx-int8 (or f16)"


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
    if flags & VNNI_FLAGS:
        return "vnni"
    return "avx2" if "avx2" in flags else "other"


def export_machine(flags: set[str] | None = None) -> dict:
    """What the manifest records of the machine whose export measured the vision files' fidelity."""
    flags = cpu_flags() if flags is None else flags
    return {"cpu_kind": cpu_kind(flags), "cpu_flags": sorted(flags & SIMD_FLAGS)}


def measured_on(manifest: dict) -> str | None:
    """One line naming the CPU the export measured the vision files' fidelity on; None for a bundle
    that does not record it (exported before manifests did) or has no measured vision file."""
    machine = manifest.get("export_machine")
    measured = [f for f in manifest["files"] if f["role"] == "vision" and f.get("fidelity") is not None
                and f["quant"] not in EXACT]
    if not machine or not measured:
        return None
    flags = ", ".join(machine.get("cpu_flags") or ()) or "no SIMD flags known"
    return f"vision fidelity measured on the exporting machine, CPU kind {machine['cpu_kind']} ({flags})"


def quant_of(entry: dict) -> str:
    """The encoding of a vision file entry (every manifest names it: runtime/manifest.py checks)."""
    return entry["quant"]


def faithful(entry: dict) -> bool:
    quant = quant_of(entry)
    return quant in EXACT or (entry.get("fidelity") is not None and entry["fidelity"] >= FIDELITY_MIN)


def runs_here(entry: dict, flags: set[str]) -> bool:
    """False where this CPU computes the file's arithmetic differently from the export (NEEDS)."""
    needs = NEEDS.get(quant_of(entry))
    return needs is None or cpu_kind(flags) in needs


def _refusal(entry: dict, entries: list[dict], flags: set[str]) -> str:
    quant = quant_of(entry)
    why = (f"the {quant} vision file needs a CPU with {' or '.join(NEEDS[quant])} (its 8-bit weights overflow "
           "the int16 sums of CPUs without it, giving wrong image embeddings)")
    here = [e for e in entries if runs_here(e, flags)]
    others = [quant_of(e) for e in [e for e in here if faithful(e)] or here]
    if others:
        return f"{why} — this bundle also holds {', '.join(others)}: pass --vision with one of those, or auto"
    return f"{why}, and this bundle holds no other — {REEXPORT}, or ask without images"


def choose_vision(entries: list[dict], want: str = "auto", *, flags: set[str] | None = None, gpu: bool = False,
                  measured=None) -> dict | None:
    """The vision file entry to run; None when the bundle has none. `want`: "auto", or an encoding
    the bundle holds (f16, onnx-int8, …). `measured(entry) -> seconds | None` gives this machine's
    encode time when known.

    InputError (one line) for a named file that is not there or that this CPU cannot run faithfully,
    and for "auto" when no file of the bundle runs faithfully here (Model then answers text and
    refuses images with that line)."""
    if not entries:
        return None
    flags = cpu_flags() if flags is None else flags
    if want != "auto":
        chosen = next((e for e in entries if quant_of(e) == want), None)
        if chosen is None:
            have = ", ".join(quant_of(e) for e in entries)
            raise InputError(f"this bundle has no {want!r} vision file (it has {have}) — pick one of those, or auto")
        if not runs_here(chosen, flags):
            raise InputError(_refusal(chosen, entries, flags))
        return chosen
    runnable = [e for e in entries if runs_here(e, flags)]
    if not runnable:
        raise InputError(_refusal(entries[0], entries, flags))
    pool = [e for e in runnable if faithful(e)] or runnable[:1]  # else the primary (first) it can run
    if measured is not None:
        times = {id(e): measured(e) for e in pool}
        if all(t is not None for t in times.values()):
            return min(pool, key=lambda e: times[id(e)])
    kind = cpu_kind(flags, gpu)
    rank = SPEED_RANK[kind]
    if kind != "gpu" and not flags & BF16_FLAGS:
        rank = tuple(q for q in rank if q != "bf16") + ("bf16",)
    return min(pool, key=lambda e: rank.index(quant_of(e)) if quant_of(e) in rank else len(rank))

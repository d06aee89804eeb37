"""Whether llama.cpp repacks the text weights: `load(repack="auto")` decides per kind of CPU.

llama.cpp can keep the weights in a layout repacked for this CPU's kernels (its "extra buffer
types"): faster decode where those kernels pay (AVX-512). Loaded from an mmapped file, the file's
pages stay resident beside the repacked copy, the weights held twice; read without mmap, only the
copy stays, for about the memory of the plain mmapped load (benchmarks/results/REPACK.md).

    repack=True     repacked, the file read without mmap (`ask --repack-weights`)
    repack=False    the file mmapped as is, llama.cpp's plain kernels (`ask --no-repack-weights`)
    repack="auto"   True on the kinds of CPU where a committed measurement says it held (HELD),
                    False elsewhere (kinds nobody measured) and with the model on a GPU

The page-cache trade-off: an mmapped file's pages are the page cache's, shared by every process that
maps the same file and given back under memory pressure; read without mmap, the weights are each
process's own memory. Several processes on one bundle (a server's workers, `ask` beside `serve`)
each hold their own copy with repacking — pass False there to share one.
"""

from __future__ import annotations

from medgemma_edge.runtime.errors import InputError

AUTO = "auto"
# Kinds of CPU where `auto` repacks: only kinds whose run kept repacked + no mmap in
# benchmarks/bench_repack.py (decode at least as fast as llama.cpp's own `Llama`, peak RSS within
# RSS_GOAL of the plain mmapped load); the run and its CPU flags are in benchmarks/results/repack.json,
# and tests/test_repack.py checks this table against it.
# Empty: measured on both kinds of CPU, the default does not change, because repacking makes the
# first answer slower on both. Repacked + no mmap met the goal on AVX-512 VNNI
# (benchmarks/results/repack.json, well ahead of our plain load) and, in the second AVX2 run, on AVX2
# (benchmarks/results/avx2/repack.json, within noise of `Llama`; the first AVX2 run missed). But on
# AVX2 it decodes no faster than our own plain load, which already runs at `Llama`'s speed there
# (REPACK.md's "/ ours plain" column), and on both kinds reading the 4B file without mmap loads
# seconds slower (its load column) and the repacked kernels prefill slower (each REPORT.md's stages
# table: "ours q4_k_m, repacked weights" against "text only"; about half the rate on VNNI): an image
# question's ~330 prompt positions cost more than a short answer's decode gains.
# `--repack-weights` / `load(repack=True)` turn it on for a long-lived server with long answers.
HELD: frozenset[str] = frozenset()


def cpu_kind(flags: set[str]) -> str:
    """The kind of x86 CPU that matters to llama.cpp's repacked kernels, from its flags."""
    if "avx512f" in flags:
        return "avx512_vnni" if "avx512_vnni" in flags else "avx512"
    return "avx2" if "avx2" in flags else "other"


def check_repack(repack) -> None:
    if repack is not True and repack is not False and repack != AUTO:
        raise InputError(f"repack must be True, False or 'auto', got {repack!r:.40}")


def decide(repack=AUTO, *, gpu: bool = False, flags: set[str] | None = None) -> tuple[bool, bool]:
    """(repack, mmap) for llama.cpp's model load: repacking reads the file without mmap."""
    check_repack(repack)
    if repack == AUTO:
        if flags is None:
            from medgemma_edge.runtime.vision_choice import cpu_flags

            flags = cpu_flags()
        repack = not gpu and cpu_kind(flags) in HELD
    return bool(repack), not repack

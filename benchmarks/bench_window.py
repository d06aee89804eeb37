"""CT windowing of a 512×512×85 int16 volume: the table kernel against the plain numpy float
recipe, both timed in this run, plus a memory-copy roofline.

    python -m benchmarks.bench_window            # 85 slices of 512×512, best of 3
    python -m benchmarks.bench_window --quick    # 16 slices, best of 2

The anchor is `window_reference` (Google's notebook arithmetic: clip, float32, subtract, divide,
multiply, round, per window) on the HU volume; the kernel is `apply_windows` on the stored
int16 values. The roofline is the time to stream the same bytes (int16 in, RGB out) through
memory once, measured with a plain copy of that many bytes.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from medgemma_edge.kernels.window import apply_windows, stored_to_hu, window_reference

MEDGEMMA = ((-1024, 1024), (-135, 215), (0, 80))
INTERCEPT = -1024.0  # the usual CT rescale: stored 0 = -1024 HU


def say(text: str) -> None:
    print(text, flush=True)


def phantom(depth: int, size: int, seed: int = 0) -> np.ndarray:
    """(D, H, W) int16 stored values shaped like a body CT: air, soft tissue, lungs, bone."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    lungs = ((np.abs(x) - 0.35) / 0.25) ** 2 + (y / 0.4) ** 2 < 1
    bone = ((x / 0.85) ** 2 + (y / 0.65) ** 2 > 0.88) & body
    hu = np.full((size, size), -1000.0)
    hu[body], hu[lungs], hu[bone] = 40.0, -850.0, 900.0
    vol = np.empty((depth, size, size), np.int16)
    for d in range(depth):
        noise = rng.normal(0, 20, (size, size))
        vol[d] = np.clip(hu + noise - INTERCEPT, -32768, 32767).astype(np.int16)
    return vol


def best_of(fn, repeat: int, label: str) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for i in range(repeat):
        start = time.perf_counter()
        out = fn()
        took = time.perf_counter() - start
        best = min(best, took)
        say(f"      {label} run {i + 1}/{repeat}: {took * 1e3:8.1f} ms")
    return best, out


def copy_seconds(nbytes: int, repeat: int) -> float:
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return best


def run(depth: int = 85, size: int = 512, repeat: int = 3) -> dict:
    say(f"[1/5] phantom volume {depth}×{size}×{size} int16 ...")
    vol = phantom(depth, size)

    say("[2/5] anchor: numpy float recipe (stored → HU float64 → 3 windows in float32)")
    ref_s, want = best_of(lambda: window_reference(stored_to_hu(vol, 1.0, INTERCEPT), MEDGEMMA),
                          repeat, "reference")

    say("[3/5] kernel: first call (builds the 65536-row table)")
    start = time.perf_counter()
    apply_windows(vol[:1], MEDGEMMA, 1.0, INTERCEPT)
    cold_s = time.perf_counter() - start
    say(f"      table + one slice: {cold_s * 1e3:8.1f} ms")

    say("[4/5] kernel: table gather over the volume")
    kern_s, got = best_of(lambda: apply_windows(vol, MEDGEMMA, 1.0, INTERCEPT), repeat, "kernel")
    same = bool(np.array_equal(got, want))

    say("[5/5] roofline: copy the same bytes once")
    moved = vol.nbytes + got.nbytes
    roof_s = copy_seconds(moved, repeat) / 2  # a copy reads and writes: moved bytes count twice
    return {"volume": f"{depth}x{size}x{size} int16", "reference_s": ref_s, "kernel_s": kern_s,
            "table_build_s": cold_s, "speedup": ref_s / kern_s, "roofline_s": roof_s,
            "of_roofline": roof_s / kern_s, "identical": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 slices, best of 2")
    parser.add_argument("--repeat", type=int, default=None, help="runs per method (best kept)")
    args = parser.parse_args(argv)
    depth, repeat = (16, 2) if args.quick else (85, 3)
    r = run(depth=depth, repeat=args.repeat or repeat)
    say("")
    say(f"CT windowing, {r['volume']}, 3 windows (MedGemma 1.5 preset):")
    say(f"  numpy float reference   {r['reference_s'] * 1e3:9.1f} ms   1.00×")
    say(f"  table kernel            {r['kernel_s'] * 1e3:9.1f} ms   {r['speedup']:.2f}× faster"
        f"   (identical bytes: {r['identical']})")
    say(f"  memory roofline         {r['roofline_s'] * 1e3:9.1f} ms   kernel at "
        f"{r['of_roofline'] * 100:.0f}% of it")
    return 0 if r["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Image path speed: our preprocessing vs transformers' (load_image + Gemma3ImageProcessor) on an
X-ray-sized gray PNG (2500 x 2048, 8-bit) and its 16-bit twin, measured in the same run.

    python -m benchmarks.bench_preprocess [--repeat 7]

Both sides start from the same PNG file and end with the (1, 3, 896, 896) float32 tensor.
Decoding the PNG is a cost both pay and neither can cut, so it is printed as the floor (libspng,
which the runtime uses for plain PNGs; Pillow's own decode is printed too): the best ratio any
preprocessing could reach is HF time / decode time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.inputs import load_pictures
from runtime.preprocess import to_model_input

WIDTH, HEIGHT = 2500, 2048
GOAL = 5.0


def synthetic_xray(bits: int, seed: int = 0) -> np.ndarray:
    """(H, W) gray: soft body, rib-like bands, lungs, detector noise. Compresses like a real film
    (a noise-free picture would decode unrealistically fast and flatter the floor)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(-1, 1, HEIGHT, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, WIDTH, dtype=np.float32)[None, :]
    body = np.exp(-(x / 0.8) ** 2 - (y / 0.95) ** 4)
    lungs = np.exp(-((np.abs(x) - 0.4) / 0.22) ** 2 - (y / 0.6) ** 2)
    ribs = 0.5 + 0.5 * np.sin(y * 40 + 3 * x ** 2)
    density = 0.15 + 0.75 * body - 0.35 * lungs + 0.08 * ribs * body  # (H, W), 0..1
    top = (1 << bits) - 1
    noise = rng.normal(0, 0.01, density.shape).astype(np.float32)
    return np.clip((density + noise) * top, 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def best_and_median(fn, repeat: int) -> tuple[float, float, object]:
    fn()  # warm-up: imports, plugin registration, first-touch allocations
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3, statistics.median(times) * 1e3, out


def bench_file(path: Path, label: str, repeat: int, hf) -> None:
    print(f"\n== {label}: {path.name} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)

    def decode():
        with Image.open(path) as im:
            im.load()

    pillow, pillow_med, _ = best_and_median(decode, repeat)
    print(f"  decode only, Pillow      {pillow:7.1f} ms  (median {pillow_med:.1f})", flush=True)
    floor = pillow
    try:
        import pyspng

        data = path.read_bytes()
        floor, floor_med, _ = best_and_median(lambda: pyspng.load(data), repeat)
        print(f"  decode only, libspng     {floor:7.1f} ms  (median {floor_med:.1f})  <- the floor", flush=True)
    except ImportError:
        pass
    ours, ours_med, ours_out = best_and_median(
        lambda: to_model_input(load_pictures(str(path)), fit="stretch"), repeat)
    print(f"  ours, fit=stretch        {ours:7.1f} ms  (median {ours_med:.1f})", flush=True)
    pad, pad_med, _ = best_and_median(lambda: to_model_input(load_pictures(str(path)), fit="pad"),
                                      repeat)
    print(f"  ours, fit=pad            {pad:7.1f} ms  (median {pad_med:.1f})", flush=True)
    if hf is None:
        print("  transformers not installed: no anchor to compare with")
        return
    load_image, processor = hf
    ref, ref_med, ref_out = best_and_median(
        lambda: processor(load_image(str(path)), return_tensors="np")["pixel_values"], repeat)
    print(f"  HF load_image+processor  {ref:7.1f} ms  (median {ref_med:.1f})", flush=True)
    ratio = ref / ours
    after_decode = (ref - floor) / max(ours - floor, 1e-9)
    print(f"  speed-up vs HF           {ratio:7.2f}x  (goal {GOAL:.0f}x: "
          f"{'met' if ratio >= GOAL else 'not met'})")
    print(f"  after decoding           {after_decode:7.2f}x  (HF - decode) / (ours - decode)")
    print(f"  roofline                 {ref / floor:7.2f}x  at best (HF / decode alone)")
    diff = float(np.abs(ours_out - ref_out).max())
    if label.startswith("8-bit"):
        print(f"  parity with HF           max|d| = {diff:.3g} (expected 0)")
    else:
        white = float((ref_out == 1.0).mean())
        print(f"  HF clips 16-bit at 255:  {white:.0%} of its values are white; ours maps the "
              f"full range (max|d| {diff:.3g}, by design)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per measurement")
    args = parser.parse_args()
    try:
        from transformers import Gemma3ImageProcessor
        from transformers.image_utils import load_image

        hf = (load_image, Gemma3ImageProcessor(size={"height": 896, "width": 896},
                                               do_pan_and_scan=False))
    except ImportError:
        hf = None
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {WIDTH}x{HEIGHT} test X-rays (8-bit and 12-bit-in-16) ...", flush=True)
        files = {}
        for bits, label in ((8, "8-bit gray PNG"), (12, "16-bit gray PNG (12-bit data)")):
            path = Path(tmp) / f"xray_{bits}.png"
            Image.fromarray(synthetic_xray(bits)).save(path)
            files[label] = path
        for label, path in files.items():
            bench_file(path, label, args.repeat, hf)


if __name__ == "__main__":
    main()

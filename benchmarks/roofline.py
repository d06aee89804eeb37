"""What this machine could do at best: measured memory bandwidth and GEMM throughput, turned into
a decode ceiling (tokens/s) and an image-encode floor (seconds) for the model being measured.

    decode ceiling = read bandwidth / bytes read per token (the text GGUF: every weight once,
                     the tied embedding included, since it is also the output head)
    encode floor   = SigLIP + projector FLOPs / float32 GEMM FLOP/s (numpy's BLAS on all cores)

Both are measured with numpy on as many threads as the backends use (in a fresh process whose
BLAS is limited to that many threads), so they describe the cores the model runs on, not a
vendor's peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BANDWIDTH_BYTES = 1 << 30  # 1 GiB: far beyond every cache
GEMM_N = 2048


def best_s(fn, repeat: int) -> float:
    fn()  # first touch, thread start-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def memory_bandwidth(threads: int, repeat: int = 5, nbytes: int = BANDWIDTH_BYTES) -> dict:
    """GB/s for reading (the faster of two full reads split across threads: a SIMD max-reduction
    and a BLAS dot product, both far cheaper than the memory traffic) and for copying (bytes read
    + written). numpy releases the GIL inside both, so the threads run in parallel."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(src, threads)
    with ThreadPoolExecutor(threads) as pool:
        max_s = best_s(lambda: list(pool.map(np.max, parts)), repeat)
        dot_s = best_s(lambda: list(pool.map(lambda x: np.dot(x, x), parts)), repeat)
        dst = np.empty_like(src)
        dparts = np.array_split(dst, threads)
        copy_s = best_s(lambda: list(pool.map(lambda i: np.copyto(dparts[i], parts[i]), range(threads))), repeat)
    return {"read_gb_s": round(nbytes / min(max_s, dot_s) / 1e9, 2),
            "read_max_gb_s": round(nbytes / max_s / 1e9, 2), "read_dot_gb_s": round(nbytes / dot_s / 1e9, 2),
            "copy_gb_s": round(2 * nbytes / copy_s / 1e9, 2), "bytes": nbytes, "threads": threads}


def gemm_throughput(repeat: int = 3, n: int = GEMM_N) -> dict:
    """float32 n x n x n matmul in GFLOP/s through numpy's BLAS (its own threads: all cores)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    dt = best_s(lambda: a @ b, repeat)
    return {"gflop_s": round(2 * n ** 3 / dt / 1e9, 1), "n": n}


def image_encoder_flops(vision: dict, text_hidden: int, tokens_per_image: int) -> float:
    """Multiply-adds x 2 of SigLIP + Gemma 3 projector for one image (norms, softmax, GELU left out:
    under 1% at MedGemma's shapes)."""
    d, m, layers = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    p, size = vision["patch_size"], vision["image_size"]
    t = (size // p) ** 2  # patches: 64 x 64 = 4096 at 896 px
    patch_embed = 2 * t * (3 * p * p) * d
    attn_proj = 2 * t * d * d * 4  # q, k, v, out
    attn_mix = 2 * t * t * d * 2  # QK^T and AV over all heads
    mlp = 2 * t * d * m * 2  # fc1, fc2
    projector = 2 * tokens_per_image * d * text_hidden
    return float(patch_embed + layers * (attn_proj + attn_mix + mlp) + projector)


def measure(threads: int, text_gguf_bytes: int, encode_flops: float, quick: bool = False) -> dict:
    bw = memory_bandwidth(threads, repeat=3 if quick else 5, nbytes=BANDWIDTH_BYTES // (4 if quick else 1))
    gemm = gemm_throughput(repeat=2 if quick else 3)
    return {
        "bandwidth": bw, "gemm": gemm,
        "text_gguf_bytes": text_gguf_bytes, "encode_gflop": round(encode_flops / 1e9, 1),
        "decode_ceiling_tok_s": round(bw["read_gb_s"] * 1e9 / text_gguf_bytes, 2),
        "encode_floor_s": round(encode_flops / (gemm["gflop_s"] * 1e9), 3),
    }


def measure_in_process(threads: int, text_gguf_bytes: int, encode_flops: float, quick: bool = False) -> dict:
    """`measure` in a fresh interpreter whose BLAS uses `threads` threads (it reads the count once,
    at import, from the environment)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    args = [sys.executable, "-m", "benchmarks.roofline", str(threads), str(text_gguf_bytes), repr(encode_flops)]
    out = subprocess.run(args + (["--quick"] if quick else []), env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


if __name__ == "__main__":  # python -m benchmarks.roofline THREADS GGUF_BYTES FLOPS [--quick] -> JSON
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), "--quick" in sys.argv)))

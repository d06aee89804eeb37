"""The encode's floor with onnxruntime's own kernels on this CPU (issue #26, encoder part).

An encode is mostly two kinds of products: the attention's (QKᵀ and AV, activation by activation:
float in MultiHeadAttention, int8 in the -attn rewrite) and the linear layers' (activation by
weight: int8 DynamicQuantizeMatMul). bench_encoder times each group in its profile; this module
measures, in the same run and process, how fast onnxruntime multiplies at all on this CPU: one lone
MatMul of the encoder's largest layer shape ([tokens, width] · [width, mlp]), float and int8 with the
file's weight type, under the encoder's own session options. Dividing each group's multiply-adds by
that rate gives the time the group would take if it ran as fast as a lone, large GEMM, and their sum
(plus the profile's rest) is the floor of an encode with these kernels. A goal under that floor asks
for kernels onnxruntime does not have on this CPU; a goal over it says where the gap is.

Two more rates say whether better kernels would reach such a goal: onnxruntime's u8 × s8 GEMM (the
product a fused int8 attention would run: on AVX2 it is exact for 7-bit K and V, on VNNI for any)
and numpy's BLAS in float, under the same thread count. The attention's products at the best of
them give the floor with the fastest kernel measured on this CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def work(vision, image_size: int | None = None) -> dict:
    """Multiply-adds of one encode's attention products and linear layers (SigLIP, MedGemma's tower:
    q, k, v, out and two MLP layers per layer; the patch embedding and projector are under 1 %)."""
    d, m, layers = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    t = ((image_size or vision.image_size) // vision.patch_size) ** 2
    return {"tokens": t, "attention": float(layers * 2 * t * t * d), "linear": float(layers * t * (4 * d * d + 2 * d * m))}


def _matmul_model(rows: int, k: int, n: int):
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32) * k ** -0.5
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="layer/MatMul")], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def gemm_rates(rows: int, k: int, n: int, threads: int, signed_weights: bool, repeat: int = 3) -> dict:
    """G multiply-adds/s of one [rows, k] · [k, n] MatMul through onnxruntime: float32, and int8 as
    the export quantizes the linear layers (export/onnx_vision._quantize_int8: dynamic u8 activations;
    weights per channel, signed for the -vnni files, unsigned for onnx-int8)."""
    import onnx
    import onnxruntime as ort

    from benchmarks.roofline import best_s
    from medgemma_edge.export.onnx_vision import _quantize_int8
    from medgemma_edge.runtime.backends.onnx_vision import session_options

    x = np.random.default_rng(1).standard_normal((rows, k), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f32.onnx"
        onnx.save(_matmul_model(rows, k, n), str(src))
        files = {"float": src, "int8": Path(tmp) / "int8.onnx", "int8_s8": Path(tmp) / "int8-s8.onnx"}
        _quantize_int8(src, files["int8"], full_range=signed_weights)
        if signed_weights:  # the file's own weights are already s8
            del files["int8_s8"]
        else:
            _quantize_int8(src, files["int8_s8"], full_range=True)
        macs = float(rows) * k * n
        rates = {}
        for name, path in files.items():
            sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
            rates[name] = round(macs / best_s(lambda: sess.run(None, {"x": x}), repeat) / 1e9, 1)
            del sess
    return {"shape": [rows, k, n], "threads": threads, "signed_weights": signed_weights,
            "float_gmac_s": rates["float"], "int8_gmac_s": rates["int8"],
            "int8_s8_gmac_s": rates.get("int8_s8", rates["int8"]), "blas_float_gmac_s": blas_rate(rows, k, n, threads, repeat)}


def _blas_gmac_s(rows: int, k: int, n: int, repeat: int) -> float:
    from benchmarks.roofline import best_s

    a = np.random.default_rng(1).standard_normal((rows, k), dtype=np.float32)
    b = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    # its first products run slow (threads and pages warming): more repeats than onnxruntime's
    return rows * k * n / best_s(lambda: a @ b, repeat + 3) / 1e9


def blas_rate(rows: int, k: int, n: int, threads: int, repeat: int = 3) -> float | None:
    """G multiply-adds/s of the same product in float through numpy's BLAS, in a child process whose
    BLAS runs `threads` threads (its thread count is fixed when it loads); None if it fails."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "benchmarks.encoder_floor", "blas", str(rows), str(k), str(n), str(repeat)]
    try:
        out = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                             timeout=600, check=True)
        return round(json.loads(out.stdout.strip().splitlines()[-1]), 1)
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def floor(w: dict, rates: dict, groups_s: dict, int8_attention: bool) -> dict:
    """Seconds each group would take at the lone GEMM's rate (rates: gemm_rates), against the seconds
    it took (groups_s: the profile's groups scaled to the median encode), and the floor of an encode
    with these kernels; the rates are kept in it."""
    attn_rate = rates["int8_gmac_s"] if int8_attention else rates["float_gmac_s"]
    attn_s = w["attention"] / (attn_rate * 1e9)
    linear_s = w["linear"] / (rates["int8_gmac_s"] * 1e9)
    rest = groups_s.get("rest", 0.0)
    took_a, took_l = groups_s.get("attention", 0.0), groups_s.get("linear layers", 0.0)
    kernels = {"onnxruntime u8 × s8 int8": rates.get("int8_s8_gmac_s"), "numpy BLAS float": rates.get("blas_float_gmac_s"),
               "onnxruntime float": rates["float_gmac_s"], "onnxruntime int8": rates["int8_gmac_s"]}
    best_kernel, best_rate = max(((k, v) for k, v in kernels.items() if v), key=lambda kv: kv[1])
    best_attn_s = min(attn_s, w["attention"] / (best_rate * 1e9))
    return {"rates": rates, "attention_s": round(attn_s, 2), "linear_s": round(linear_s, 2), "rest_s": round(rest, 2),
            "floor_s": round(attn_s + linear_s + rest, 2), "attention_rate": "int8" if int8_attention else "float",
            "best_kernel": best_kernel, "best_gmac_s": best_rate, "best_attention_s": round(best_attn_s, 2),
            "best_floor_s": round(best_attn_s + linear_s + rest, 2),
            "attention_gmac_s": round(w["attention"] / took_a / 1e9, 1) if took_a else None,
            "linear_gmac_s": round(w["linear"] / took_l / 1e9, 1) if took_l else None}


def explain(f: dict, goal_s: float) -> str:
    """The floor (floor's result) as a clause of the goal's reason."""
    rates = f["rates"]
    text = (f"at this run's lone-GEMM rates through onnxruntime ({rates['float_gmac_s']:.0f} G float and "
            f"{rates['int8_gmac_s']:.0f} G int8 multiply-adds/s, [{'×'.join(map(str, rates['shape']))}], "
            f"{rates['threads']} threads) the attention's products need ≥ {f['attention_s']:.1f} s in "
            f"{f['attention_rate']} (they ran at {f['attention_gmac_s']} G/s) and the linear layers ≥ "
            f"{f['linear_s']:.1f} s (they ran at {f['linear_gmac_s']} G/s): floor {f['floor_s']:.1f} s with the rest")
    if f["floor_s"] <= goal_s:
        return text + f", under the goal's {goal_s:.0f} s: the gap is the kernels' efficiency at the encoder's shapes"
    text += f", above the goal's {goal_s:.0f} s: it needs faster kernels than onnxruntime has on this CPU"
    if f["best_attention_s"] >= f["attention_s"]:
        return text
    others = ", ".join(f"{k} {rates[key]:.0f} G/s" for k, key in (("numpy BLAS float", "blas_float_gmac_s"),
                       ("onnxruntime u8 × s8 int8", "int8_s8_gmac_s")) if rates.get(key) and k != f["best_kernel"])
    text += (f"; with the attention's products at the fastest rate measured here ({f['best_kernel']}, "
             f"{f['best_gmac_s']:.0f} G/s" + (f"; {others}" if others else "") + f") the floor is {f['best_floor_s']:.1f} s")
    if f["best_floor_s"] <= goal_s:
        text += (f", under the goal: it takes an attention that runs its products at that rate in one fused "
                 f"kernel, which onnxruntime's CPU provider does not have")
    else:
        text += ", still above the goal: no kernel measured on this CPU reaches it"
    return text


if __name__ == "__main__" and sys.argv[1:2] == ["blas"]:  # blas_rate's child: python -m benchmarks.encoder_floor blas R K N REPEAT
    print(json.dumps(_blas_gmac_s(*map(int, sys.argv[2:6]))))

"""Image → embeddings through onnxruntime (a bundle exported with --vision-quant onnx-int8/onnx-f32).

Same contract as runtime/backends/mtmd.VisionEncoder: `encode` takes the S×S uint8 RGB image
from runtime/preprocess and returns (tokens, n_embd) float32, which the model places into the
decoder itself. The pixels are normalized here with the manifest's mean/std
(runtime.preprocess.normalize_views, transformers' arithmetic to the bit), so the graph sees exactly
what Gemma3ImageProcessor would hand the tower.

onnxruntime opens no sockets; with onnxruntime-gpu installed and device auto/cuda the CUDA
execution provider runs it.
"""

from __future__ import annotations

import os

import numpy as np

from medgemma_edge.runtime.backends.providers import choose_providers
from medgemma_edge.runtime.machine import resolve_threads
from medgemma_edge.runtime.errors import BundleError, InputError
from medgemma_edge.runtime.preprocess import normalize_views


def session_options(threads: int = 0):
    """onnxruntime's options for a vision tower (also what benchmarks/bench_encoder.py profiles with)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = resolve_threads(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Memory (the text model is resident beside it): prepacking keeps a second, repacked copy
    # of every weight matrix for no measurable speed here (each matmul has 4096 rows; packing B
    # per call is ~1/4096 of it). Turning the arena off instead of shrinking it after each encode
    # (OnnxVisionEncoder) left glibc holding the freed blocks. Peak memory of an image question:
    # benchmarks/results/REPORT.md.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


class OnnxVisionEncoder:
    def __init__(self, path: str, n_embd: int, threads: int = 0, device: str = "cpu",
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        import onnxruntime as ort

        opts = session_options(threads)
        # arena shrinkage hands the activations back after each encode instead of holding them for
        # the next image (session_options says why the arena stays on)
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        providers = choose_providers(device, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as err:
            raise BundleError(f"onnxruntime could not load the vision file {os.path.basename(path)} "
                              f"({type(err).__name__}) — run `medgemma-edge verify` on the bundle, or "
                              "export it again") from None
        inp, out = self._session.get_inputs()[0], self._session.get_outputs()[0]
        self._input = inp.name
        shape = inp.shape  # [1, 3, S, S]
        if len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int):
            raise BundleError(f"{os.path.basename(path)} does not take (1, 3, S, S) pixels — export the bundle again")
        self.size = int(shape[2])
        width = out.shape[-1]
        if isinstance(width, int) and width != n_embd:
            raise BundleError(f"the vision file gives {width}-wide embeddings, the text model takes "
                              f"{n_embd} — the vision file does not belong to this model")
        self.n_embd = n_embd
        self.providers = self._session.get_providers()
        self._mean, self._std = list(mean), list(std)

    def encode(self, rgb_uint8: np.ndarray) -> np.ndarray:
        """Embeddings (n_tokens, n_embd) float32 for one (S, S, 3) uint8 RGB image."""
        if self._session is None:
            raise RuntimeError("OnnxVisionEncoder is closed")
        img = np.asarray(rgb_uint8)
        if img.dtype != np.uint8 or img.shape != (self.size, self.size, 3):
            raise InputError(f"expected a ({self.size}, {self.size}, 3) uint8 RGB image, got {img.dtype} {img.shape}")
        pixels = normalize_views(img[None], self._mean, self._std)  # (1, 3, S, S)
        out = self._session.run(None, {self._input: pixels}, self._run_options)[0]
        return np.ascontiguousarray(out[0], dtype=np.float32)

    def close(self) -> None:
        self._session = None

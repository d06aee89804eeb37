"""Backends: llama.cpp for the decoder; llama.cpp's mtmd or onnxruntime for the vision tower."""

from __future__ import annotations

from pathlib import Path


def open_vision(path, llama_model_ptr, n_embd: int, threads: int = 0, device: str = "cpu", image: dict | None = None):
    """The bundle's vision encoder, by file type: a GGUF mmproj through mtmd, an .onnx graph
    through onnxruntime. Both have encode((S, S, 3) uint8) -> (tokens, n_embd) float32 and close()."""
    if Path(path).suffix == ".onnx":
        from medgemma_edge.runtime.backends.onnx_vision import OnnxVisionEncoder

        image = image or {}
        return OnnxVisionEncoder(str(path), n_embd, threads, device, mean=image.get("mean", (0.5,) * 3),
                                 std=image.get("std", (0.5,) * 3))
    from medgemma_edge.runtime.backends.mtmd import VisionEncoder

    return VisionEncoder(str(path), llama_model_ptr, threads)

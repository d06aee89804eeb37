"""Which onnxruntime execution providers a session gets, from the user's --device.

One rule for every ONNX graph of a bundle (vision tower, text decoder): "cpu" runs on the CPU
only; "auto" puts CUDA first when this onnxruntime has it (onnxruntime-gpu), CPU after it for the
ops CUDA lacks; "cuda" insists on CUDA and says how to get it when it is missing.

GPU support is a swap of installed packages, not an extra (pyproject.toml says why): the commands
below are the ones `--device cuda` names when a CPU build is installed.
"""

from __future__ import annotations

from medgemma_edge.runtime.errors import InputError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
ORT_GPU_SWAP = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
LLAMA_GPU_REBUILD = 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python'


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(device: str, available: list[str] | None = None) -> list[str]:
    """Providers in priority order for `device`; `available` defaults to this onnxruntime's."""
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r:.40} — use auto, cpu or cuda")
    if device == "cpu":
        return [CPU]
    has_cuda = CUDA in (available_providers() if available is None else available)
    if device == "cuda" and not has_cuda:
        raise InputError("device 'cuda' asked for, but this onnxruntime has no CUDA provider — swap it for "
                         f"the GPU build ({ORT_GPU_SWAP}), or use --device cpu")
    return [CUDA, CPU] if has_cuda else [CPU]

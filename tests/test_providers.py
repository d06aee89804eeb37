"""runtime/backends/providers.choose_providers: --device → onnxruntime execution providers, with
mocked provider lists (this machine's onnxruntime has no CUDA), and its use by the vision encoder."""

import pytest

from pathlib import Path

from medgemma_edge.runtime.backends.providers import CPU, CUDA, LLAMA_GPU_REBUILD, ORT_GPU_SWAP, choose_providers
from medgemma_edge.runtime.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

CPU_ONLY = ["AzureExecutionProvider", CPU]
WITH_CUDA = ["TensorrtExecutionProvider", CUDA, CPU]


@pytest.mark.parametrize("device,available,want", [
    ("auto", CPU_ONLY, [CPU]),
    ("auto", WITH_CUDA, [CUDA, CPU]),
    ("cpu", WITH_CUDA, [CPU]),
    ("cpu", CPU_ONLY, [CPU]),
    ("cuda", WITH_CUDA, [CUDA, CPU]),
])
def test_choice(device, available, want):
    assert choose_providers(device, available) == want


def test_cuda_without_the_cuda_provider_says_what_to_install():
    with pytest.raises(InputError) as err:
        choose_providers("cuda", CPU_ONLY)
    msg = str(err.value)
    print(msg)
    assert "\n" not in msg and "pip uninstall -y onnxruntime && pip install onnxruntime-gpu" in msg
    assert msg.endswith("or use --device cpu")


def test_cuda_without_gpu_llama_cpp_says_how_to_rebuild(monkeypatch):
    import llama_cpp

    from medgemma_edge.runtime.engines import gpu_layers

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    with pytest.raises(InputError) as err:
        gpu_layers("cuda")
    print(err.value)
    assert "\n" not in str(err.value) and 'CMAKE_ARGS="-DGGML_CUDA=on" pip install' in str(err.value)
    assert gpu_layers("auto") == 0


def test_gpu_is_a_documented_swap_not_an_extra():
    """onnxruntime-gpu and onnxruntime install the same module: an extra beside the dependency
    would leave whichever was unpacked last. pyproject.toml shows the swap the errors name."""
    import tomllib

    text = (ROOT / "pyproject.toml").read_text()
    project = tomllib.loads(text)["project"]
    wanted = [r for rs in project["optional-dependencies"].values() for r in rs] + project["dependencies"]
    print([r for r in wanted if "onnxruntime" in r])
    assert not any(r.replace(" ", "").startswith("onnxruntime-gpu") for r in wanted)
    assert ORT_GPU_SWAP in text and LLAMA_GPU_REBUILD in text


def test_unknown_device():
    with pytest.raises(InputError, match="use auto, cpu or cuda"):
        choose_providers("tpu", CPU_ONLY)


def test_default_reads_this_onnxruntime(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: WITH_CUDA)
    assert choose_providers("auto") == [CUDA, CPU]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: CPU_ONLY)
    assert choose_providers("auto") == [CPU]


def test_vision_encoder_uses_the_same_rule(monkeypatch, tmp_path):
    import onnxruntime

    from medgemma_edge.runtime.backends.onnx_vision import OnnxVisionEncoder

    seen = {}

    class Session:
        def __init__(self, path, opts, providers):
            seen["providers"] = providers
            raise RuntimeError("stop here")

    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: WITH_CUDA)
    with pytest.raises(Exception):
        OnnxVisionEncoder(str(tmp_path / "v.onnx"), 256, 1, "auto")
    assert seen["providers"] == [CUDA, CPU]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: CPU_ONLY)
    with pytest.raises(InputError, match="onnxruntime-gpu"):
        OnnxVisionEncoder(str(tmp_path / "v.onnx"), 256, 1, "cuda")

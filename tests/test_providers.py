"""runtime/backends/providers.choose_providers: --device → onnxruntime execution providers, with
mocked provider lists (this machine's onnxruntime has no CUDA), and its use by the vision encoder."""

import pytest

from medgemma_edge.runtime.backends.providers import CPU, CUDA, choose_providers
from medgemma_edge.runtime.errors import InputError

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
    assert "\n" not in msg and "install onnxruntime-gpu in place of onnxruntime, or use --device cpu" in msg


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

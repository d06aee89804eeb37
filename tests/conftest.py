"""Session fixtures: the reference models are built once per run into the cache directory."""

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*incorrect regex pattern.*")


@pytest.fixture(scope="session")
def tiny_dir():
    from medgemma_edge.testing.models import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def gemma270m_dir():
    from medgemma_edge.testing.models import build_gemma3_270m

    return build_gemma3_270m()


@pytest.fixture(scope="session")
def gemma270m_gguf():
    from medgemma_edge.testing.models import gemma3_270m_gguf

    return gemma3_270m_gguf()


def _export(tmp_path_factory, src, name, quant, vision_quant):
    from medgemma_edge.export.bundle import export_gguf

    out = tmp_path_factory.mktemp("bundles") / name
    export_gguf(src, out, quant=quant, vision_quant=vision_quant, quality=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_f32(tmp_path_factory, tiny_dir):
    """`tiny` exported at f32 (text and vision): the parity bundle."""
    return _export(tmp_path_factory, tiny_dir, "tiny-f32", "f32", "f32")


@pytest.fixture(scope="session")
def gemma270m_bundle_f32(tmp_path_factory, gemma270m_dir):
    """Real Gemma 3 270M weights exported at f32 (text only)."""
    return _export(tmp_path_factory, gemma270m_dir, "gemma270m-f32", "f32", None)


@pytest.fixture(scope="session")
def onnx_bundles(tmp_path_factory, tiny_dir):
    """tiny exported to ONNX bundles on first use: fp32 (onnx-f32 vision), int8 with the quality
    report (onnx-int8 vision), int4 (onnx-int8 vision). Session-wide: tests/test_onnx_bundle.py and
    tests/test_structured_onnx.py share one export."""
    from medgemma_edge.export.bundle_onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx-bundles")
    recipe = {"fp32": ("onnx-f32", False), "int8": (("onnx-int8",), True), "int4": ("onnx-int8", False)}
    built = {}

    def get(quant):
        if quant not in built:
            vq, quality = recipe[quant]
            built[quant] = export_onnx(tiny_dir, root / quant, quant, vq, quality=quality, threads=2)
            print(f"{quant} bundle: {built[quant].seconds:.1f} s, peak {built[quant].peak_mb}")
        return built[quant]

    return get

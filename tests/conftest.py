"""Session fixtures: the reference models are built once per run into the cache directory.

Disk: a whole run writes ~17 GB of bundles into pytest's temporary folder if nothing is removed, more
than a CI machine may have free. A passing test's tmp_path goes when it ends (pyproject:
tmp_path_retention_policy = "failed"), and what a module's fixtures made with tmp_path_factory goes
when the module ends (`_module_temp_dirs`); the session fixtures below register theirs to keep.
"""

import shutil
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


_SESSION_DIRS = set()


def _session_temp(tmp_path_factory, name):
    """A tmp_path_factory folder that lives for the whole run (not removed at module end)."""
    path = tmp_path_factory.mktemp(name)
    _SESSION_DIRS.add(path.name)
    return path


@pytest.fixture(scope="module", autouse=True)
def _module_temp_dirs(tmp_path_factory):
    """Remove the folders this module's fixtures made under the run's temporary folder once it ends.

    Autouse at module scope: set up before the module's own fixtures, so torn down after them.
    Folders named after a test (a test's tmp_path) are left to pytest's retention policy (removed
    when the test passed, kept when it failed)."""
    base = tmp_path_factory.getbasetemp()
    before = {p.name for p in base.iterdir()}
    yield
    for path in base.iterdir():
        if path.name in before or path.name in _SESSION_DIRS or path.name.startswith("test_"):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _export(tmp_path_factory, src, name, quant, vision_quant):
    from medgemma_edge.export.bundle import export_gguf

    out = _session_temp(tmp_path_factory, "bundles") / name
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

    root = _session_temp(tmp_path_factory, "onnx-bundles")
    recipe = {"fp32": ("onnx-f32", False), "int8": (("onnx-int8",), True), "int4": ("onnx-int8", False)}
    built = {}

    def get(quant):
        if quant not in built:
            vq, quality = recipe[quant]
            built[quant] = export_onnx(tiny_dir, root / quant, quant, vq, quality=quality, threads=2)
            print(f"{quant} bundle: {built[quant].seconds:.1f} s, peak {built[quant].peak_mb}")
        return built[quant]

    return get

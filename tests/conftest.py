"""Session fixtures: the reference models are built once per run into the cache directory."""

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*incorrect regex pattern.*")


@pytest.fixture(scope="session")
def tiny_dir():
    from export.testmodels import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def gemma270m_dir():
    from export.testmodels import build_gemma3_270m

    return build_gemma3_270m()


@pytest.fixture(scope="session")
def gemma270m_gguf():
    from export.testmodels import gemma3_270m_gguf

    return gemma3_270m_gguf()

"""Building the wheel and installing it into a scratch venv, as a user would: shared by
tests/test_packaging.py (the wheel's contents, --no-deps) and tests/test_clinic_install.py (the
wheel with its declared runtime dependencies, no extras)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(out: Path) -> Path:
    """The project's wheel, built into `out` from a clean copy of what the wheel is made of
    (pyproject.toml, README.md and the package folders): a build in the checkout would leave build/
    and *.egg-info there, and setuptools' build/ keeps modules deleted since, which the wheel would
    then hold."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    src = out / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in dict.fromkeys(project["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (whl,) = out.glob("medgemma_edge-*.whl")
    return whl


def make_venv(path: Path) -> Path:
    """An empty venv without pip of its own (this environment's pip installs into it with
    `--python`); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def pip_install(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """This environment's pip, installing into the venv of `python`."""
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", *args],
                          capture_output=True, text=True, timeout=900, cwd=cwd)


def pinned_to_this_environment(path: Path) -> Path:
    """A pip constraints file pinning every distribution installed here to its version here: the
    scratch venv gets the versions the tests run with, from pip's cache (llama-cpp-python is
    compiled from source once per version, then taken from pip's wheel cache)."""
    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != "medgemma-edge":
            pins[name.lower()] = f"{name}=={dist.version}"
    path.write_text("\n".join(sorted(pins.values())) + "\n")
    return path


def scrubbed_env(**extra: str) -> dict:
    """This process's environment without what would let the venv see this checkout or this
    environment's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env

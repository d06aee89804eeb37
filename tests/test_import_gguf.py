"""`medgemma-edge import` and a .gguf given where a bundle goes: GGUFs people already have.

The pair comes from llama.cpp's own converter (the llama-cpp-python source distribution of the
installed version, fetched with `pip download`: medgemma_edge/testing/llamacpp.py) run on the tiny
reference checkpoint (with Gemma 3's standard layer rhythm, see that module). Imported, it must give
transformers' logits and our own export's on a text and an image prompt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medgemma_edge
from medgemma_edge.runtime.errors import BundleError, InputError
from medgemma_edge.runtime.gguf_import import import_gguf
from medgemma_edge.runtime.manifest import sha256_file
from medgemma_edge.testing.llamacpp import converted_pair, pattern6_checkpoint
from tests import reference as ref
from tests.gguf_fakes import projector_gguf, text_gguf

COS_MIN = 0.9999


@pytest.fixture(scope="module")
def pair():
    return converted_pair()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """896² noise: no resize between our path and transformers' (the comparison is of the models)."""
    path = tmp_path_factory.mktemp("pic") / "noise.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (896, 896, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def imported(pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imp") / "bundle"
    import_gguf(pair[0], out, mmproj=pair[1])
    return out


def _messages(picture: Path | None):
    content = [{"type": "text", "text": "Describe the finding in one word."}]
    if picture is not None:
        content.insert(0, {"type": "image", "image": str(picture)})
    return [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": content}]


def _run(*args, env=None):
    """The command in this process (click's runner: exit code, stdout and stderr apart)."""
    from click.testing import CliRunner

    from medgemma_edge.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def _one_line_exit2(done, *needles):
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.exit_code == 2 and len(lines) == 1, (done.exit_code, done.stderr[-2000:])
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_llamacpp_converted_pair_answers_as_transformers_and_our_export(imported, pair, picture, tmp_path):
    ckpt = str(pattern6_checkpoint())
    from medgemma_edge.export.bundle import export_gguf

    ours = export_gguf(ckpt, tmp_path / "ours", "f32", ["f32"], quality=False).bundle
    models = {"imported": medgemma_edge.load(imported), "direct": medgemma_edge.load(pair[0], mmproj=pair[1]),
              "our export": medgemma_edge.load(ours)}
    for pic in (None, picture):
        messages = _messages(pic)
        theirs = ref.next_token_logits(ckpt, messages)
        got = {name: m.next_token_logits(messages) for name, m in models.items()}
        what = "image" if pic else "text"
        ref.assert_same_logits(got["imported"], theirs, f"imported llama.cpp pair vs transformers ({what})", COS_MIN)
        ref.assert_same_logits(got["imported"], got["our export"], f"imported pair vs our export ({what})", COS_MIN)
        worst = float(np.abs(got["direct"] - got["imported"]).max())
        assert worst == 0.0, f"a .gguf opened directly differs from its imported bundle by {worst}"


def test_import_links_the_files_and_describes_them(imported, pair):
    manifest = json.loads((imported / "manifest.json").read_text())
    text, mmproj = (imported / f["path"] for f in manifest["files"])
    for mine, theirs in zip((text, mmproj), pair):
        assert mine.stat().st_ino == theirs.stat().st_ino and not mine.is_symlink(), "not a hard link"
    assert manifest["source"]["kind"] == "imported" and manifest["quality"] is None
    assert manifest["image"]["size"] == 896 and manifest["image"]["tokens_per_image"] == 256
    assert manifest["context_length"] == 8192 and manifest["quantization"]["text"] == "f32"
    assert manifest["chat_template"] and "start_of_turn" in manifest["chat_template"]
    assert manifest["special_tokens"]["image_soft_token"] == 262144
    assert [f["sha256"] for f in manifest["files"]] == [sha256_file(p) for p in pair]
    done = _run("verify", imported)
    assert done.exit_code == 0 and "imported GGUF: no quality report" in done.stdout, done.stdout + done.stderr


def test_direct_gguf_in_ask_and_text_only_refusals(pair, picture, tmp_path):
    done = _run("ask", "-m", pair[0], "--mmproj", pair[1], "--image", picture, "What is shown?", "--max-tokens", 3,
                "--stats")
    assert done.exit_code == 0, done.stderr[-2000:]
    assert "imported GGUF: no quality report" in done.stderr
    _one_line_exit2(_run("ask", "-m", pair[0], "--image", picture, "What?"), pair[0].name, "--mmproj")
    text_only = tmp_path / "text-only"
    import_gguf(pair[0], text_only)
    _one_line_exit2(_run("ask", "-m", text_only, "--image", picture, "What?"), "import", "--mmproj")
    _one_line_exit2(_run("ask", "-m", text_only, "--mmproj", pair[1], "What?"), "--mmproj goes with a .gguf")


def test_mismatches_are_one_line(pair, tmp_path):
    png = tmp_path / "scan.gguf"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    llama = text_gguf(tmp_path / "llama.gguf", arch="llama")
    wide = projector_gguf(tmp_path / "mmproj-wide.gguf", projection_dim=512)
    small = projector_gguf(tmp_path / "mmproj-small.gguf", image_size=448)
    odd = projector_gguf(tmp_path / "mmproj-odd.gguf", image_size=900)
    llava = projector_gguf(tmp_path / "mmproj-llava.gguf", projector="mlp")
    lora = text_gguf(tmp_path / "adapter.gguf", general_type="adapter")
    split = text_gguf(tmp_path / "model-00001-of-00002.gguf", split=2)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(pair[0].read_bytes()[:4096])
    cases = [((png,), ("scan.gguf", "not a GGUF file")),
             ((llama,), ("llama.gguf", "not Gemma 3")),
             ((pair[1],), (pair[1].name, "vision projector", "--mmproj")),
             ((lora,), ("adapter.gguf", "LoRA adapter")),
             ((split,), ("model-00001-of-00002.gguf", "split GGUF", "--merge")),
             ((cut,), ("cut.gguf", "incomplete")),
             ((pair[0], "--mmproj", pair[0]), ("both the model and --mmproj",)),
             ((pair[0], "--mmproj", llama), ("llama.gguf", "not a vision projector")),
             ((pair[0], "--mmproj", wide), ("mmproj-wide.gguf", "512", "256", "another model size")),
             ((pair[0], "--mmproj", small), ("mmproj-small.gguf", "64 tokens per image")),
             ((pair[0], "--mmproj", odd), ("mmproj-odd.gguf", "do not tile")),
             ((pair[0], "--mmproj", llava), ("mmproj-llava.gguf", "'mlp' projector"))]
    for i, (args, needles) in enumerate(cases):
        out = tmp_path / f"b{i}"
        _one_line_exit2(_run("import", *args, "-o", out), *needles)
        assert not out.exists(), f"a refused import left {out}"
        _one_line_exit2(_run("ask", "-m", *args, "hello"), *needles)


def _lmstudio(root: Path, pair, q8: Path) -> Path:
    model = root / "lmstudio-community" / "medgemma-tiny-GGUF"
    model.mkdir(parents=True)
    os.link(pair[0], model / "medgemma-tiny-F32.gguf")
    os.link(q8, model / "medgemma-tiny-Q8_0.gguf")
    os.link(pair[1], model / "mmproj-medgemma-tiny-F16.gguf")
    return model


def test_lm_studio_folder_lists_quants_and_imports_the_chosen_one(pair, tmp_path):
    from medgemma_edge.export.bundle import export_gguf

    q8 = next((export_gguf(str(pattern6_checkpoint()), tmp_path / "q8", "q8_0", ["f32"], quality=False).bundle)
              .glob("*q8_0.gguf"))
    root = tmp_path / "models"
    model = _lmstudio(root, pair, q8)
    line = _one_line_exit2(_run("import", root, "-o", tmp_path / "x"), "several quants", "--quant")
    assert "q8_0 (medgemma-tiny-Q8_0.gguf)" in line and "f32 (medgemma-tiny-F32.gguf)" in line
    _one_line_exit2(_run("import", root, "--quant", "q4_k_m", "-o", tmp_path / "x"), "no q4_k_m quant")
    done = _run("import", root, "--quant", "q8_0", "-o", tmp_path / "b")
    assert done.exit_code == 0, done.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["medgemma-tiny-Q8_0.gguf", "mmproj-medgemma-tiny-F16.gguf"]
    assert manifest["quantization"]["text"] == "q8_0"
    assert (tmp_path / "b" / "medgemma-tiny-Q8_0.gguf").stat().st_ino == q8.stat().st_ino
    other = root / "someone" / "other-GGUF"
    other.mkdir(parents=True)
    os.link(pair[0], other / "other-F32.gguf")
    _one_line_exit2(_run("import", root, "--quant", "q8_0", "-o", tmp_path / "y"), "several models")
    done = _run("import", model, "--quant", "f32", "-o", tmp_path / "c")  # the model's own folder
    assert done.exit_code == 0, done.stderr


def _ollama_store(root: Path, name: str, tag: str, layers: list[tuple[str, Path]]) -> None:
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    entries = []
    for media, path in layers:
        digest = sha256_file(path)
        if not (blobs / f"sha256-{digest}").exists():
            os.link(path, blobs / f"sha256-{digest}")
        entries.append({"mediaType": f"application/vnd.ollama.image.{media}", "digest": f"sha256:{digest}",
                        "size": path.stat().st_size})
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2,
                                    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                               "digest": "sha256:" + "0" * 64, "size": 2},
                                    "layers": entries}))


def test_ollama_store_imports_a_pair_and_refuses_the_fused_layout(pair, imported, tmp_path):
    store = tmp_path / "ollama"
    template = tmp_path / "template"
    template.write_text("{{ .Prompt }}")
    _ollama_store(store, "medgemma-tiny", "f32", [("model", pair[0]), ("projector", pair[1]),
                                                  ("template", template)])
    fused = text_gguf(tmp_path / "fused.gguf", ollama_fused=True)
    _ollama_store(store, "gemma3", "latest", [("model", fused), ("template", template)])
    env = {"OLLAMA_MODELS": str(store)}
    done = _run("import", "ollama:medgemma-tiny:f32", "-o", tmp_path / "b", env=env)
    assert done.exit_code == 0, done.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [f["sha256"] for f in manifest["files"]] == [f["sha256"] for f in
                                                         json.loads((imported / "manifest.json").read_text())["files"]]
    assert manifest["source"]["origin"] == "ollama:medgemma-tiny:f32"
    assert (tmp_path / "b" / "medgemma-tiny-f32.gguf").stat().st_ino == pair[0].stat().st_ino
    _one_line_exit2(_run("import", "ollama:gemma3", "-o", tmp_path / "c", env=env),
                    "ollama:gemma3:latest", "Ollama's own gemma3 layout", "mmproj")
    _one_line_exit2(_run("import", "ollama:absent:7b", "-o", tmp_path / "d", env=env), "not in Ollama's store")
    _one_line_exit2(_run("import", "ollama:../../etc:x", "-o", tmp_path / "e", env=env), "not an Ollama model name")


def test_import_without_a_link_says_copy_and_copies(pair, tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(BundleError, match="add --copy"):
        import_gguf(pair[0], tmp_path / "a", mmproj=pair[1])
    assert not (tmp_path / "a").exists()
    res = import_gguf(pair[0], tmp_path / "b", mmproj=pair[1], copy=True)
    assert not res.linked and (tmp_path / "b" / pair[0].name).stat().st_ino != pair[0].stat().st_ino
    assert sha256_file(tmp_path / "b" / pair[1].name) == sha256_file(pair[1])
    with pytest.raises(InputError, match="not an empty folder"):
        import_gguf(pair[0], tmp_path / "b")


def test_damaged_headers_are_one_error(pair, tmp_path):
    """Cut or scrambled headers: a BundleError naming the file, never another exception."""
    from medgemma_edge.runtime.gguf_meta import read_gguf_info

    head = pair[1].read_bytes()[:2500]  # inside the projector's header and tensor list (~2.9 KB)
    rng = np.random.default_rng(3)
    path = tmp_path / "damaged.gguf"
    outcomes = {"ok": 0, "refused": 0}
    for i in range(300):
        data = bytearray(head[: int(rng.integers(4, len(head)))])
        for _ in range(int(rng.integers(0, 4))):
            data[int(rng.integers(4, len(data)))] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            read_gguf_info(path)
            outcomes["ok"] += 1
        except BundleError as err:
            assert "damaged.gguf" in str(err) and "\n" not in str(err), err
            outcomes["refused"] += 1
    assert outcomes["refused"] > 250, outcomes  # every cut is inside the header; flips may shorten it


def test_serve_checks_a_gguf_before_its_port_opens(pair, tmp_path):
    from medgemma_edge.cli.serve import make_backend

    loader = make_backend(pair[0], None, mmproj=pair[1])
    assert callable(loader)
    wide = projector_gguf(tmp_path / "mmproj-wide.gguf", projection_dim=512)
    with pytest.raises(BundleError, match="another model size"):
        make_backend(pair[0], None, mmproj=wide)

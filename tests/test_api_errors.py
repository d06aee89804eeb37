"""Careless and hostile arguments to the Python API, malformed manifests and out-of-range options:
always the project's own error (a MedGemmaEdgeError subclass) with one line, never a traceback
from inside, and from the CLI one line with exit code 2."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from medgemma_edge import BundleError, InputError, MedGemmaEdgeError
from medgemma_edge.cli import main


@pytest.fixture(scope="module")
def model(tiny_bundle_f32):
    import medgemma_edge

    return medgemma_edge.load(tiny_bundle_f32, threads=2, context=1024)


BAD_MESSAGES = {
    "None": None,
    "a string": "What is this?",
    "bytes": b"hello",
    "an empty list": [],
    "a list of strings": ["hello"],
    "no role": [{"content": "hi"}],
    "an unknown role": [{"role": "doctor", "content": "hi"}],
    "a system message second": [{"role": "user", "content": "hi"}, {"role": "system", "content": "S"}],
    "content a number": [{"role": "user", "content": 5}],
    "items that are strings": [{"role": "user", "content": ["hi", "there"]}],
    "text that is a number": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    "an unknown item type": [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}],
    "an image without source": [{"role": "user", "content": [{"type": "image"}]}],
    "an image of a wrong type": [{"role": "user", "content": [{"type": "image", "image": 3.5}]}],
    "only a system message": [{"role": "system", "content": "S"}],
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_bad_messages_are_input_errors(model, case):
    for call in (lambda m: model.chat(m, max_new_tokens=1), lambda m: model.next_token_logits(m)):
        with pytest.raises(InputError) as err:
            call(BAD_MESSAGES[case])
        assert "\n" not in str(err.value)
    print(f"{case}: {err.value}")


def test_a_system_message_second_says_so(model):
    with pytest.raises(InputError, match="must come first"):
        model.chat(BAD_MESSAGES["a system message second"], max_new_tokens=1)


OK = [{"role": "user", "content": "hi"}]
BAD_OPTIONS = {
    "max_new_tokens str": dict(max_new_tokens="5"),
    "max_new_tokens bool": dict(max_new_tokens=True),
    "max_new_tokens 0": dict(max_new_tokens=0),
    "temperature str": dict(temperature="hot"),
    "temperature negative": dict(temperature=-1.0),
    "top_p None": dict(top_p=None),
    "top_p 0": dict(top_p=0.0),
    "top_k float": dict(top_k=2.5),
    "seed str": dict(seed="abc"),
    "stop number": dict(stop=5),
    "stop list of numbers": dict(stop=[1, 2]),
    "stop empty string in list": dict(stop=[""]),
    "think str": dict(think="yes"),
    "max_slices 0": dict(max_slices=0),
    "max_slices str": dict(max_slices="85"),
    "fit unknown": dict(fit="crop"),
    "window number": dict(window=40),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_options_are_input_errors(model, case):
    with pytest.raises(InputError) as err:
        model.chat(OK, **BAD_OPTIONS[case])
    assert "\n" not in str(err.value)
    print(f"{case}: {err.value}")


@pytest.mark.parametrize("kwargs", [dict(threads="2"), dict(threads=0), dict(context=-5), dict(fit="crop"),
                                    dict(device="tpu"), dict(bundle_dir=None), dict(bundle_dir=42)])
def test_bad_load_arguments_are_input_errors(tiny_bundle_f32, kwargs):
    import medgemma_edge

    args = {"bundle_dir": tiny_bundle_f32, **kwargs}
    with pytest.raises(InputError):
        medgemma_edge.load(**args)


def _broken(tmp_path, tiny_bundle_f32, edit):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_f32, bundle)
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    text = edit(m)
    path.write_text(text if isinstance(text, str) else json.dumps(m))
    return bundle


MANIFEST_EDITS = {
    "path a number": lambda m: m["files"][0].__setitem__("path", 5),
    "path a list": lambda m: m["files"][0].__setitem__("path", ["a", "b"]),
    "size a string": lambda m: m["files"][0].__setitem__("size", "100"),
    "files a dict": lambda m: m.__setitem__("files", {"text": "x.gguf"}),
    "image size a string": lambda m: m["image"].__setitem__("size", "896"),
    "image mean too short": lambda m: m["image"].__setitem__("mean", [0.5]),
    "special tokens a list": lambda m: m.__setitem__("special_tokens", [1, 2]),
    "special token a string": lambda m: m["special_tokens"].__setitem__("image_soft_token", "262144"),
    "format version a dict": lambda m: m.__setitem__("format_version", {"v": 1}),
    "a list at top level": lambda m: "[1, 2, 3]",
    "deeply nested": lambda m: "[" * 100000 + "]" * 100000,
    "path with a NUL": lambda m: m["files"][0].__setitem__("path", "a\x00b.gguf"),
    "path escaping the folder": lambda m: m["files"][0].__setitem__("path", "../../etc/passwd"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_malformed_manifests_are_bundle_errors(tiny_bundle_f32, tmp_path, case):
    import medgemma_edge

    bundle = _broken(tmp_path, tiny_bundle_f32, MANIFEST_EDITS[case])
    with pytest.raises(BundleError) as err:
        medgemma_edge.load(bundle, threads=2, context=256)
    assert "\n" not in str(err.value)
    result = CliRunner().invoke(main, ["verify", str(bundle)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
    print(f"{case}: {err.value}")


@pytest.mark.parametrize("size", ["100000", "0", "-3"])
def test_preprocess_size_is_bounded(tmp_path, size):
    from PIL import Image

    src = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    result = CliRunner().invoke(main, ["preprocess", str(src), "--size", size, "-o", str(tmp_path / "x.npy")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_preprocess_refuses_views_that_would_not_fit_in_memory():
    from medgemma_edge.runtime.preprocess import model_view

    with pytest.raises(InputError, match="GiB"):
        model_view([np.zeros((4, 4, 3), np.uint8)] * 100, size=4096)


def test_every_project_error_is_one_base_class():
    from medgemma_edge.runtime.errors import BusyError, ExportError

    for cls in (InputError, BundleError, ExportError, BusyError):
        assert issubclass(cls, MedGemmaEdgeError)

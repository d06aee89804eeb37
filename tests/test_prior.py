"""A prior X-ray beside the current one (issue #24): Google's longitudinal CXR layout
(medgemma_edge/longitudinal.py) on every face — the Python helper, `ask --prior`, the server's prior
part — against transformers' processor for the same two pictures, on the tiny random bundle."""

import base64
import io

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import medgemma_edge
from medgemma_edge.cli import main
from medgemma_edge.longitudinal import PROMPT, RECIPE, longitudinal_messages
from medgemma_edge.runtime.chat_template import ChatTemplate
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.server.errors import ApiError
from tests import reference as ref
from tests.dicom_helpers import image_dataset, rewrite, save

QUESTION = "Compare these two chest X-rays."


@pytest.fixture(scope="module")
def model(tiny_bundle_f32):
    return medgemma_edge.load(tiny_bundle_f32, threads=2, context=2048)


def _picture(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _first_difference(ours, theirs) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"first differing position {at} of {len(ours)} vs {len(theirs)}: {ours[at:at + 5]} vs {theirs[at:at + 5]}"


def test_the_layout_is_the_notebooks():
    msgs = longitudinal_messages("now.png", "then.png")
    assert msgs == [{"role": "user", "content": [{"type": "image", "image": "then.png"},
                                                 {"type": "image", "image": "now.png"},
                                                 {"type": "text", "text": PROMPT}]}]
    assert PROMPT == ("Provide a comparison of these two images and include details from\n"
                      "the image which students should take note of when reading longitudinal CXR\n")
    assert "80a1de1e1a306a24b69b7af4009f326bd6bae644" in RECIPE
    assert longitudinal_messages("a", "b", "Q", system="S")[0] == {"role": "system", "content": "S"}
    assert medgemma_edge.longitudinal_messages is longitudinal_messages


@pytest.mark.parametrize("question", [None, QUESTION])
def test_prompt_ids_and_image_order_equal_transformers(tiny_dir, model, question):
    """Our prompt (prefill.render: the bundle's template and tokenizer) has transformers' token ids
    for the notebook's layout, and its images are the processor's, in its order: prior, then current."""
    from medgemma_edge.runtime import prefill
    from medgemma_edge.runtime.reply import Stats

    size = model.image_size
    prior, current = _picture(1, size), _picture(2, size)  # square at the model's size: both resizes are the identity
    ours = prefill.render(model, longitudinal_messages(_png(current), _png(prior), question), think=False,
                          window=None, max_slices=1, fit=None, stats=Stats())
    # the notebook's call: processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, ...)
    enc = ref.encode_chat(tiny_dir, longitudinal_messages(Image.fromarray(current), Image.fromarray(prior), question))
    theirs = enc["input_ids"][0].tolist()
    print(f"{len(ours.ids)} ids vs {len(theirs)};", _first_difference(ours.ids, theirs) if ours.ids != theirs
          else "identical")
    assert ours.ids == theirs, _first_difference(ours.ids, theirs)
    assert len(ours.views) == 2
    want = [prior, current]
    for k, (view, pixels) in enumerate(zip(ours.views, enc["pixel_values"].numpy())):
        ours_float = view.astype(np.float32) / 127.5 - 1.0  # the processor's rescale + normalize (0.5, 0.5)
        worst = float(np.abs(ours_float - pixels.transpose(1, 2, 0)).max())
        print(f"image {k} ({'prior' if k == 0 else 'current'}): worst |d| vs the processor's pixels {worst:.2e}")
        assert np.array_equal(view, want[k]) and worst < 1e-5


def _ask(*args):
    out = CliRunner().invoke(main, ["ask", *args])
    print(out.output)
    return out


def test_ask_prior_streams_an_answer_in_the_notebooks_layout(tmp_path, tiny_bundle_f32, monkeypatch):
    """A DICOM X-ray (windowed as ever) and a PNG prior: no system prompt, prior image first; the
    preset asks the notebook's question when no PROMPT is given."""
    current = rewrite("MR_small.dcm", tmp_path / "now.dcm", Modality="DX")
    prior = tmp_path / "then.png"
    prior.write_bytes(_png(_picture(3, 64)))
    seen = []
    render = ChatTemplate.parts
    monkeypatch.setattr(ChatTemplate, "parts", lambda self, msgs, **k: seen.append(msgs) or render(self, msgs, **k))
    for args, question in ((["--max-tokens", "3", QUESTION], QUESTION),
                           (["--preset", "longitudinal-cxr", "--max-tokens", "3"], PROMPT)):
        out = _ask("-m", str(tiny_bundle_f32), "--threads", "2", "--image", str(current), "--prior", str(prior), *args)
        assert out.exit_code == 0 and out.output.strip(), out.output
        msgs = seen[-1]
        assert [m["role"] for m in msgs] == ["user"], msgs  # no system prompt
        assert [i["type"] for i in msgs[0]["content"]] == ["image", "image", "text"]
        assert msgs[0]["content"][2]["text"] == question
    with_system = _ask("-m", str(tiny_bundle_f32), "--threads", "2", "--image", str(current), "--prior", str(prior),
                       "--system", "You are an expert radiologist.", "--max-tokens", "2", QUESTION)
    assert with_system.exit_code == 0 and seen[-1][0] == {"role": "system", "content": "You are an expert radiologist."}


def test_ask_prior_refusals_are_one_line(tmp_path, tiny_bundle_f32):
    png = tmp_path / "a.png"
    png.write_bytes(_png(_picture(4, 32)))
    frames = np.stack([np.full((16, 16), 100 * k, np.int16) for k in range(3)])
    multi = save(image_dataset(frames, frames=3), tmp_path / "multi.dcm")
    folder = tmp_path / "series"
    folder.mkdir()
    m = ["-m", str(tiny_bundle_f32)]
    cases = {
        "two --image": (m + ["--image", str(png), "--image", str(png), "--prior", str(png), "Q"], "exactly one --image"),
        "no --image": (m + ["--prior", str(png), "Q"], "exactly one --image"),
        "a folder": (m + ["--image", str(png), "--prior", str(folder), "Q"], "--prior is a folder"),
        "multi-frame": (m + ["--image", str(png), "--prior", str(multi), "Q"], "--prior holds several frames"),
        "multi-frame current": (m + ["--image", str(multi), "--prior", str(png), "Q"], "--image holds several"),
        "no question": (m + ["--image", str(png), "--prior", str(png)], "no question given"),
    }
    for name, (args, words) in cases.items():
        out = _ask(*args)
        lines = [ln for ln in out.output.splitlines() if ln.strip()]
        assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (name, out.output)
        assert words in lines[0], (name, lines[0])


def _url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _part(data: bytes, prior=None, mime="image/png") -> dict:
    part = {"type": "image_url", "image_url": {"url": _url(data, mime)}}
    if prior is not None:
        part["medgemma_edge"] = {"prior": prior}
    return part


def _translate(content, role="user", **body):
    from medgemma_edge.server.translate import chat_request

    return chat_request({"messages": [{"role": role, "content": content}], **body}, {}, max_images=4, max_tokens=8)


def test_server_moves_the_prior_before_the_current():
    now, then = _png(_picture(5, 32)), _png(_picture(6, 32))
    request = _translate([_part(now), _part(then, prior=True), {"type": "text", "text": QUESTION}])
    assert request.messages == longitudinal_messages(now, then, QUESTION), request.messages  # no system prompt
    assert request.prior == "messages[0].content[1]"
    plain = _translate([_part(now), _part(then, prior=False), {"type": "text", "text": QUESTION}])
    assert plain.messages[0]["role"] == "system" and plain.prior is None  # not flagged: two images as sent
    own = _translate([_part(now), _part(then, prior=True), {"type": "text", "text": "Q"}], preset="cxr-report")
    assert own.messages[0] == {"role": "system", "content": "You are an expert radiologist."}


def test_server_prior_refusals_name_the_param(tmp_path):
    png = _png(_picture(7, 32))
    frames = np.stack([np.full((16, 16), 100 * k, np.int16) for k in range(3)])
    multi = save(image_dataset(frames, frames=3), tmp_path / "multi.dcm").read_bytes()
    text = {"type": "text", "text": "Q"}
    cases = {
        "two priors": ([_part(png), _part(png, True), _part(png, True), text], "messages[0].content[2]"),
        "no current": ([_part(png, True), text], "messages[0].content"),
        "two currents": ([_part(png), _part(png), _part(png, True), text], "messages[0].content"),
        "bad flag": ([_part(png), _part(png, "yes"), text], "messages[0].content[1].medgemma_edge.prior"),
        "unknown key": ([_part(png), {**_part(png), "medgemma_edge": {"prior": True, "x": 1}}, text],
                        "messages[0].content[1].medgemma_edge"),
        "multi-frame prior": ([_part(png), _part(multi, True, "application/dicom"), text], "messages[0].content[1]"),
        "multi-frame current": ([_part(multi, mime="application/dicom"), _part(png, True), text],
                                "messages[0].content"),
    }
    for name, (content, param) in cases.items():
        with pytest.raises(ApiError) as err:
            _translate(content)
        print(f"{name}: {err.value.param}: {err.value}")
        assert err.value.status == 400 and err.value.param == param and "\n" not in str(err.value), name
    with pytest.raises(ApiError) as err:
        _translate([_part(png), _part(png, True), text], role="assistant")
    assert err.value.param == "messages[0].content"


def test_server_answers_a_prior_as_the_python_api_does(model):
    """End to end on a live server: the flagged part (sent after the current) gives the answer the
    notebook's messages give through the Python API (greedy)."""
    from medgemma_edge.server import ServerConfig, ServerThread, build_app
    from medgemma_edge.server.backend import LocalBackend

    now, then = _png(_picture(8, 48)), _png(_picture(9, 48))
    want = model.chat(longitudinal_messages(now, then, QUESTION), max_new_tokens=3).text
    body = {"messages": [{"role": "user", "content": [_part(now), _part(then, True),
                                                      {"type": "text", "text": QUESTION}]}], "max_tokens": 3}
    with ServerThread(build_app(LocalBackend(model), ServerConfig(max_images=4))) as server:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            ok = http.post("/v1/chat/completions", json=body)
            bad = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
                _part(then, True), {"type": "text", "text": "Q"}]}]})
    got = ok.json()["choices"][0]["message"]["content"]
    print(repr(got), repr(want), bad.json())
    assert ok.status_code == 200 and got == want
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[0].content"


def test_python_helper_refuses_bad_arguments():
    with pytest.raises(InputError, match="question must be text"):
        longitudinal_messages("a", "b", question=3)

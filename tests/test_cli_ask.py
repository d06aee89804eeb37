"""`medgemma-edge ask`: streamed answers, stats, clear errors, and no network."""

import json
import socket

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medgemma_edge.cli import main
from tests.box_answer import BOX_ANSWER, answer_with, count_decodes


def _png(tmp_path, name="xray.png", size=(300, 200)):
    path = tmp_path / name
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    return path


def _ask(*args):
    return CliRunner().invoke(main, ["ask", *map(str, args)])


def _one_line_error(result):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_ask_streams_an_answer_with_stats_and_no_socket(tiny_bundle_f32, tmp_path, monkeypatch):
    class NoSocket(socket.socket):
        def __init__(self, *a, **k):
            raise AssertionError("the runtime opened a network socket")

    def refuse(*a, **k):
        raise AssertionError("the runtime tried to reach the network")

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    from pydicom.data import get_testdata_file

    result = _ask("-m", tiny_bundle_f32, "--image", _png(tmp_path), "--image", get_testdata_file("CT_small.dcm"),
                  "--max-tokens", 5, "--stats", "Compare these images.")
    assert result.exit_code == 0, result.output
    stats_line = [ln for ln in result.output.splitlines() if ln.startswith("stats ")]
    assert stats_line, result.output
    stats = json.loads(stats_line[0][len("stats "):])
    assert stats["prompt_tokens"] > 512 and stats["completion_tokens"] <= 5
    for key in ("preprocess_ms", "image_encode_s", "prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb"):
        assert key in stats, key


def test_ask_without_a_bundle_refuses_in_one_line(monkeypatch):
    """No -m and no MEDGEMMA_EDGE_MODEL: a clinic user must not get the demo model's words by accident."""
    monkeypatch.delenv("MEDGEMMA_EDGE_MODEL", raising=False)
    line = _one_line_error(_ask("Is there a pneumothorax?"))
    assert "-m BUNDLE" in line and "MEDGEMMA_EDGE_MODEL" in line and "medgemma-edge demo" in line


def test_ask_takes_the_bundle_from_the_environment(tiny_bundle_f32, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_EDGE_MODEL", str(tiny_bundle_f32))
    result = _ask("--max-tokens", 2, "Hello")
    assert result.exit_code == 0, result.output


def test_missing_bundle_is_one_line(tmp_path):
    line = _one_line_error(_ask("-m", tmp_path / "nowhere", "Hello"))
    assert "manifest" in line or "bundle" in line


def test_image_to_text_only_bundle_is_one_line(gemma270m_bundle_f32, tmp_path):
    line = _one_line_error(_ask("-m", gemma270m_bundle_f32, "--image", _png(tmp_path), "Describe."))
    assert "text-only" in line


def test_prompt_longer_than_context_is_one_line(tiny_bundle_f32):
    line = _one_line_error(_ask("-m", tiny_bundle_f32, "--context", 256, "word " * 600))
    assert "context" in line


def test_not_an_image_is_one_line(tiny_bundle_f32, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    _one_line_error(_ask("-m", tiny_bundle_f32, "--image", bad, "Describe."))


@pytest.mark.parametrize("flag", [["--temperature", "-1"], ["--max-tokens", "0"]])
def test_bad_options_exit_2(tiny_bundle_f32, flag):
    assert _ask("-m", tiny_bundle_f32, *flag, "Hi").exit_code == 2


@pytest.fixture
def box_answer(monkeypatch):
    """The model answers BOX_ANSWER in pieces; returns the count of picture decodes."""
    answer_with(monkeypatch)
    return count_decodes(monkeypatch)


@pytest.mark.parametrize("fit,pixels", [(None, "75,101,225,176"), ("stretch", "75,100.5,225,150.8")])
def test_ask_prints_boxes_on_the_original_picture(tiny_bundle_f32, tmp_path, box_answer, fit, pixels):
    """300×201 padded: (300 − 201) // 2 = 49 black rows on top, so y = b/1000·300 − 49; stretched,
    y = b/1000·201. The picture is decoded once: for the prompt, whose sizes map the boxes."""
    flags = ["--fit", fit] if fit else []
    png = _png(tmp_path, size=(300, 201))
    result = _ask("-m", tiny_bundle_f32, "--image", png, *flags, "Where is the nodule?")
    assert result.exit_code == 0, result.output
    print(result.stderr)
    assert result.stdout.strip() == BOX_ANSWER
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("box ")]
    assert lines == [f'box "nodule": box_2d [500, 250, 750, 750] (y0, x0, y1, x1 of 1000) = x0,y0,x1,y1 {pixels} px '
                     "of the 300×201 original"], result.stderr
    assert box_answer == {str(png): 1}, box_answer


def test_ask_prints_no_boxes_for_two_pictures(tiny_bundle_f32, tmp_path, box_answer):
    a, b = _png(tmp_path, "a.png"), _png(tmp_path, "b.png")
    result = _ask("-m", tiny_bundle_f32, "--image", a, "--image", b, "Where?")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == BOX_ANSWER and "box " not in result.stderr
    assert box_answer == {str(a): 1, str(b): 1}, box_answer


def test_budget_decodes_the_series_once(tiny_bundle_f32, tmp_path, box_answer, monkeypatch):
    """`--budget` plans on the whole series and the answer reads the planned slices: 12 slices
    decoded in all, not 12 + 3; the 3 kept are those (and labels) a decode of 3 slices gives."""
    import medgemma_edge
    from medgemma_edge.runtime.budget import EncodeSpeed, plan_slices
    from medgemma_edge.runtime.sources import load_pictures
    from tests.dicom_helpers import write_series

    folder = tmp_path / "ct"
    write_series(folder, 12)
    monkeypatch.setenv("MEDGEMMA_EDGE_CACHE", str(tmp_path / "home"))
    monkeypatch.setattr(EncodeSpeed, "seconds", lambda self: 10.0)  # a slow machine: 35 s hold 3 slices
    result = _ask("-m", tiny_bundle_f32, "--image", folder, "--budget", 35, "--stats", "--max-tokens", 2, "Where?")
    assert result.exit_code == 0, result.output
    stats = json.loads(next(ln for ln in result.stderr.splitlines() if ln.startswith("stats "))[6:])
    assert "budget 35 s: 3 of 12 slices" in result.stderr and stats["images"] == 3, result.stderr
    assert box_answer == {"dicom slices": 12}, box_answer
    assert "box " not in result.stderr  # a series: a box names no picture among several

    model = medgemma_edge.load(tiny_bundle_f32, threads=2, context=1024)
    plan = plan_slices(model, folder, 35.0)
    want = load_pictures(folder, max_slices=3)
    assert [p.label for p in plan.pictures] == [p.label for p in want] == ["SLICE 1", "SLICE 2", "SLICE 3"]
    worst = max(int(np.abs(a.pixels.astype(int) - b.pixels).max()) for a, b in zip(plan.pictures, want))
    print(f"planned slices vs a decode of 3: worst difference {worst}")
    assert worst == 0
    # MR is scaled over the slices decoded together: for a plan, the whole series, so the last slice
    # (in every plan) is the same picture whether 3 or 5 are kept, and its cached embedding serves both
    write_series(tmp_path / "mr", 12, modality="MR")
    three, five = (plan_slices(model, tmp_path / "mr", s) for s in (35.0, 55.0))
    assert (three.slices, five.slices) == (3, 5)
    assert np.array_equal(three.pictures[-1].pixels, five.pictures[-1].pixels)

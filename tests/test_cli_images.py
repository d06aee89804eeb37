"""`medgemma-edge preprocess` / `preview`: outputs equal the library's, series give contact sheets,
and every bad input ends with one line on stderr and exit code 2 — never a traceback."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medgemma_edge import runtime
from medgemma_edge.cli import main
from medgemma_edge.runtime.picture import Picture
from medgemma_edge.runtime.sources import load_pictures
from medgemma_edge.runtime.preprocess import model_view, normalize_views
from medgemma_edge.runtime.preview import BACKGROUND, LABEL_HEIGHT, contact_sheet
from tests.imagegen import png_header_only, smooth_rgb

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(smooth_rgb(123, 77, seed=1)).save(path)
    return path


@pytest.mark.parametrize("fit", ["pad", "stretch"])
def test_preprocess_writes_what_the_model_receives(tmp_path, photo, fit):
    out = tmp_path / "x.npy"
    result = _run("preprocess", photo, "-o", out, "--fit", fit, "--size", 64)
    assert result.exit_code == 0, result.output
    got = np.load(out)
    expected = normalize_views(model_view(load_pictures(str(photo)), size=64, fit=fit))
    assert got.shape == (1, 3, 64, 64) and got.dtype == np.float32
    assert np.array_equal(got, expected)


def test_preprocess_default_is_pad_at_896(tmp_path, photo):
    out = tmp_path / "x.npy"
    assert _run("preprocess", photo, "-o", out).exit_code == 0
    got = np.load(out)
    assert got.shape == (1, 3, 896, 896)
    assert np.array_equal(got, normalize_views(model_view(load_pictures(str(photo)), fit="pad")))


def test_preview_writes_what_the_model_sees(tmp_path, photo):
    out = tmp_path / "v.png"
    result = _run("preview", photo, "-o", out, "--fit", "stretch", "--size", 100)
    assert result.exit_code == 0, result.output
    got = np.asarray(Image.open(out))
    assert np.array_equal(got, model_view(load_pictures(str(photo)), size=100, fit="stretch")[0])


@pytest.fixture
def fake_series(monkeypatch, tmp_path):
    """A stand-in for runtime.dicom (written elsewhere): a folder becomes five labelled slices,
    and the options the CLI passed through are recorded."""
    calls = {}

    def load_dicom(src, window=None, max_slices=None):
        calls.update(src=src, window=window, max_slices=max_slices)
        return [Picture(np.ascontiguousarray(smooth_rgb(60, 40, seed=i)), f"SLICE {i + 1}")
                for i in range(5)]

    fake = types.ModuleType("medgemma_edge.runtime.dicom")
    fake.load_dicom = load_dicom
    monkeypatch.setitem(sys.modules, "medgemma_edge.runtime.dicom", fake)
    monkeypatch.setattr(runtime, "dicom", fake, raising=False)
    folder = tmp_path / "series"
    folder.mkdir()
    return folder, calls, load_dicom(folder)


def test_preview_of_a_series_is_a_labelled_contact_sheet(tmp_path, fake_series):
    folder, calls, pictures = fake_series
    out = tmp_path / "sheet.png"
    result = _run("preview", folder, "-o", out, "--size", 50, "--window", "brain",
                  "--max-slices", 5)
    assert result.exit_code == 0, result.output
    assert calls["window"] == "brain" and calls["max_slices"] == 5
    got = np.asarray(Image.open(out))
    expected = contact_sheet(model_view(pictures, size=50), [p.label for p in pictures])
    assert np.array_equal(got, expected)
    # 5 tiles -> 3 columns, 2 rows; every tile's label strip has text drawn on it.
    assert got.shape == (2 * (50 + LABEL_HEIGHT + 4), 3 * (50 + 4), 3)
    for i in range(5):
        x, y = (i % 3) * 54, (i // 3) * (50 + LABEL_HEIGHT + 4)
        strip = got[y:y + LABEL_HEIGHT, x:x + 50]
        assert (strip != np.array(BACKGROUND, np.uint8)).any(), f"tile {i + 1} has no label"


def test_preprocess_of_a_series_stacks_slices(tmp_path, fake_series):
    folder, _, pictures = fake_series
    out = tmp_path / "s.npy"
    assert _run("preprocess", folder, "-o", out, "--size", 32).exit_code == 0
    assert np.array_equal(np.load(out), normalize_views(model_view(pictures, size=32)))


def _bad_inputs(tmp_path) -> dict[str, Path]:
    cases = {}
    cases["not an image"] = tmp_path / "notes.png"
    cases["not an image"].write_text("hello")
    good = tmp_path / "good.png"
    Image.fromarray(smooth_rgb(200, 150, seed=2)).save(good)
    data = good.read_bytes()
    cases["truncated"] = tmp_path / "cut.png"
    cases["truncated"].write_bytes(data[: len(data) // 2])
    cases["unsupported mode"] = tmp_path / "lab.tif"
    Image.new("LAB", (8, 8)).save(cases["unsupported mode"])
    cases["decompression bomb"] = tmp_path / "bomb.png"
    cases["decompression bomb"].write_bytes(png_header_only(12_000, 12_000))
    cases["missing"] = tmp_path / "missing.png"
    return cases


@pytest.mark.parametrize("command,suffix", [("preprocess", "npy"), ("preview", "png")])
def test_bad_inputs_exit_2_with_one_line(tmp_path, command, suffix):
    for what, path in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out.{suffix}"
        result = _run(command, path, "-o", out)
        assert result.exit_code == 2, f"{what}: exit {result.exit_code}: {result.output!r}"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: {result.stderr!r}"
        assert "Traceback" not in result.output and result.stdout == "", what
        assert not out.exists(), what


def test_unwritable_output_is_one_line(tmp_path, photo):
    result = _run("preprocess", photo, "-o", tmp_path / "no" / "such" / "dir" / "x.npy")
    assert result.exit_code == 2 and "cannot write" in result.stderr


def test_real_process_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "cut.jpg"
    Image.fromarray(smooth_rgb(64, 64, seed=3)).save(bad, "JPEG")
    bad.write_bytes(bad.read_bytes()[:300])
    proc = subprocess.run(
        [sys.executable, "-c", "from medgemma_edge.cli import main; main()", "preprocess", str(bad),
         "-o", str(tmp_path / "x.npy")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr

"""`medgemma-edge preview` on a DICOM series: --window and --max-slices reach load_dicom, the
sheet shows the kept slices, and a refusal is one line with exit code 2 and no patient value."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from medgemma_edge.cli import main
from medgemma_edge.runtime.preview import GAP, LABEL_HEIGHT
from tests.dicom_helpers import PATIENT_MARKERS, write_series


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_preview_of_a_ct_series_keeps_max_slices(tmp_path):
    write_series(tmp_path / "ct", 30)
    out = tmp_path / "sheet.png"
    result = run("preview", str(tmp_path / "ct"), "-o", str(out), "--max-slices", "9",
                 "--window", "-1000:500,-100:100,20:60", "--size", "32")
    assert result.exit_code == 0, result.output
    assert "9 picture(s)" in result.output
    sheet = np.asarray(Image.open(out))
    # 9 tiles of 32 px on a 3×3 sheet (runtime/preview.py's layout)
    assert sheet.shape == (3 * (32 + LABEL_HEIGHT + GAP), 3 * (32 + GAP), 3), sheet.shape
    assert not any(value in result.output for value in PATIENT_MARKERS.values())


def test_preview_refuses_a_ct_window_on_mr_in_one_line(tmp_path):
    from pydicom.data import get_testdata_file

    result = run("preview", get_testdata_file("MR_small.dcm"), "-o", str(tmp_path / "x.png"),
                 "--window", "lung")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "CT windows" in lines[0]
    assert not (tmp_path / "x.png").exists()

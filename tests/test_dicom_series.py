"""runtime/dicom/series.py: series written here slice by slice (tiny files in tmp_path), so
which slice came out where can be read back from its pixels."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset

from medgemma_edge.kernels.window import stored_to_hu, window_reference
from medgemma_edge.runtime.dicom import load_dicom
from medgemma_edge.runtime.dicom.series import select_indices
from medgemma_edge.runtime.errors import InputError
from tests.dicom_helpers import (SIDE, assert_same, image_dataset, save, slice_pixels,
                                 write_series)

MEDGEMMA = ((-1024, 1024), (-135, 215), (0, 80))


def expected(k: int) -> np.ndarray:
    return window_reference(stored_to_hu(slice_pixels(k), 1.0, -1024.0), MEDGEMMA)


def which_slice(pixels: np.ndarray, n: int) -> int | None:
    return next((k for k in range(n) if (expected(k) == pixels).all()), None)


def assert_slices(pictures, n, want_indices):
    got = [which_slice(p.pixels, n) for p in pictures]
    assert got == want_indices, f"kept slices {got}, expected {want_indices}"
    if len(pictures) > 1:
        assert [p.label for p in pictures] == [f"SLICE {i}" for i in range(1, len(pictures) + 1)]
    for p, k in zip(pictures, want_indices):
        assert_same(p.pixels, expected(k), f"slice {k}")


def test_select_indices_is_the_formula():
    assert select_indices(120, 85) == [round(i / 85 * 119) for i in range(1, 86)]
    assert select_indices(85, 85) == list(range(85)) and select_indices(3, 85) == [0, 1, 2]
    for n in range(1, 400, 7):
        for m in (1, 2, 10, 85):
            kept = select_indices(n, m)
            assert len(kept) == min(n, m)
            assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] == n - 1


def test_120_slices_keep_the_85_of_the_formula_in_order(tmp_path):
    write_series(tmp_path / "ct", 120)
    pictures = load_dicom(tmp_path / "ct")
    want = [round(i / 85 * 119) for i in range(1, 86)]
    assert len(pictures) == 85 and want[0] == 1 and want[-1] == 119
    assert_slices(pictures, 120, want)


def test_max_slices_is_honoured_and_a_list_of_files_works(tmp_path):
    paths = write_series(tmp_path / "ct", 40)
    pictures = load_dicom([str(p) for p in paths], max_slices=10)
    assert_slices(pictures, 40, [round(i / 10 * 39) for i in range(1, 11)])
    assert_slices(load_dicom(tmp_path / "ct", max_slices=1), 40, [39])


def test_position_orders_slices_without_instance_numbers(tmp_path):
    write_series(tmp_path / "ct", 12, numbers=False, positions=True, normal_tilt=True)
    assert_slices(load_dicom(tmp_path / "ct"), 12, list(range(12)))


def test_repeated_instance_numbers_fall_back_to_position(tmp_path):
    paths = write_series(tmp_path / "ct", 6, positions=True, first_number=1)
    for p in paths:  # every file claims InstanceNumber 1
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = 1
        ds.save_as(p)
    assert_slices(load_dicom(tmp_path / "ct"), 6, list(range(6)))


def test_mixed_series_are_refused_without_showing_uids(tmp_path):
    write_series(tmp_path / "mix", 3, series_uid="1.2.826.0.1.3680043.8.498.11")
    for i in range(2):
        save(image_dataset(slice_pixels(i), series_uid="1.2.826.0.1.3680043.8.498.22",
                           instance=50 + i), tmp_path / "mix" / f"other{i}.dcm")
    with pytest.raises(InputError) as err:
        load_dicom(tmp_path / "mix")
    message = str(err.value)
    assert "2 series" in message and " — " in message and "\n" not in message
    assert "3680043" not in message, "a UID was shown"


def test_directory_skips_junk_and_non_images_and_says_why(tmp_path, capfd):
    folder = tmp_path / "export"
    write_series(folder / "sub", 5)
    (folder / "README.txt").write_text("not DICOM")
    (folder / ".DS_Store").write_bytes(b"\0" * 300)  # hidden: skipped without a word
    shutil.copy(get_testdata_file("reportsi.dcm"), folder / "report.dcm")  # SR: no pixels
    shutil.copy(get_testdata_file("rtdose.dcm"), folder / "dose.dcm")  # not a picture
    Image.new("RGB", (4, 4)).save(folder / "photo.dcm", "PNG")  # a picture, named .dcm
    assert_slices(load_dicom(folder), 5, list(range(5)))
    notes = capfd.readouterr().err.splitlines()
    assert notes == [f"note: {folder / 'README.txt'}: skipped — not a DICOM file",
                     f"note: {folder / 'dose.dcm'}: skipped — an RT dose grid",
                     f"note: {folder / 'photo.dcm'}: skipped — not a DICOM file",
                     f"note: {folder / 'report.dcm'}: skipped — no image in it (a report, "
                     f"plan or other non-image object)"], notes


def test_files_without_preamble_are_slices_too(tmp_path, capfd):
    # Old exports write the bare dataset: no 128-byte preamble, no 'DICM', no file meta. The
    # README promises they are read; in a folder they used to vanish without a word.
    paths = write_series(tmp_path / "ct", 6)
    for p in paths[:3]:
        ds = pydicom.dcmread(p)
        ds.file_meta, ds.preamble = FileMetaDataset(), None
        ds.save_as(p, implicit_vr=p != paths[0], little_endian=True, enforce_file_format=False)
        assert p.read_bytes()[128:132] != b"DICM"
    assert_slices(load_dicom(tmp_path / "ct"), 6, list(range(6)))
    assert capfd.readouterr().err == ""


def test_localizer_is_left_out(tmp_path):
    write_series(tmp_path / "ct", 4)
    scout = image_dataset(slice_pixels(9), instance=1)
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    save(scout, tmp_path / "ct" / "scout.dcm")
    assert_slices(load_dicom(tmp_path / "ct"), 10, [0, 1, 2, 3])


def test_multi_frame_file_is_a_volume(tmp_path):
    volume = np.stack([slice_pixels(k) for k in range(100)])  # (100, H, W)
    path = save(image_dataset(volume, frames=100), tmp_path / "enhanced.dcm")
    assert_slices(load_dicom(path), 100, [round(i / 85 * 99) for i in range(1, 86)])


def test_mr_series_shares_one_min_max(tmp_path):
    folder = tmp_path / "mr"
    folder.mkdir()
    stacks = [np.full((SIDE, SIDE), 100 * k, np.int16) + np.eye(SIDE, dtype=np.int16) * 7
              for k in range(5)]
    for k, px in enumerate(stacks):
        save(image_dataset(px, modality="MR", instance=k + 1, slope=None, intercept=None),
             folder / f"{k}.dcm")
    pictures = load_dicom(folder)
    all_values = np.stack(stacks).astype(np.float64)
    lo, hi = all_values.min(), all_values.max()
    for k, p in enumerate(pictures):
        want = np.round((stacks[k] - lo) / (hi - lo) * 255.0).astype(np.uint8)
        assert_same(p.pixels, np.repeat(want[:, :, None], 3, axis=2), f"MR slice {k}")
    with pytest.raises(InputError, match="CT windows"):
        load_dicom(folder, window="lung")

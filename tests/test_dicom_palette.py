"""PALETTE COLOR (issue 12 item 5): every table entry is scaled from the bits its LUT Descriptor
declares, read in the file's byte order, whatever width it is stored in. Files are written here
so that each table is known; the expected picture is the table lookup written out in numpy."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medgemma_edge.runtime.dicom import load_dicom
from medgemma_edge.runtime.errors import InputError
from tests.dicom_helpers import assert_same, palette_dataset, palette_tables as tables

ENTRIES = 256
PIXELS = np.arange(ENTRIES, dtype=np.uint8).reshape(8, 32)  # every index once


def write(path, *, little: bool, bits: int, width: int, vr: str = "OW", first_map: int = 0,
          table=None):
    ds = palette_dataset(PIXELS, tables(bits) if table is None else table, little=little,
                         bits=bits, width=width, vr=vr, first_map=first_map)
    ds.save_as(path, implicit_vr=False, little_endian=little, enforce_file_format=True)
    return path


def expected(bits: int, first_map: int = 0) -> np.ndarray:
    index = np.clip(PIXELS.astype(np.int64) - first_map, 0, ENTRIES - 1)
    return (tables(bits)[:, index] >> (bits - 8)).transpose(1, 2, 0).astype(np.uint8)


# (little endian, declared bits, bytes per stored entry); an 8-bit OB table has no byte order
CASES = [(True, 8, 1), (True, 8, 2), (False, 8, 2), (True, 16, 2), (False, 16, 2)]


@pytest.mark.parametrize("little,bits,width", CASES,
                         ids=["LE-8", "LE-8-in-16", "BE-8-in-16", "LE-16", "BE-16"])
def test_palette_entries_scale_by_their_declared_bits(tmp_path, little, bits, width):
    path = write(tmp_path / "p.dcm", little=little, bits=bits, width=width,
                 vr="OB" if width == 1 else "OW")
    got = load_dicom(path)[0].pixels
    assert_same(got, expected(bits), f"{'LE' if little else 'BE'} {bits}-bit in {8 * width}")
    assert got.max() == 255, "the brightest entry must reach 255 (an all-black picture did not)"


def test_palette_read_as_us_and_with_a_first_mapped_value(tmp_path):
    path = write(tmp_path / "us.dcm", little=False, bits=16, width=2, vr="US")
    assert_same(load_dicom(path)[0].pixels, expected(16), "BE 16-bit table stored as US")
    path = write(tmp_path / "first.dcm", little=True, bits=16, width=2, first_map=100)
    assert_same(load_dicom(path)[0].pixels, expected(16, first_map=100), "first mapped 100")


def test_palette_values_beyond_their_declared_bits_are_refused(tmp_path):
    # 16-bit values under a descriptor that says 8: which byte is the colour cannot be known
    path = write(tmp_path / "liar.dcm", little=True, bits=8, width=2, table=tables(16))
    with pytest.raises(InputError, match="palette colour table is missing or damaged"):
        load_dicom(path)


def test_shipped_palette_file_agrees_with_pydicom():
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))  # LE, 16-bit entries
    want = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)
    assert_same(load_dicom(get_testdata_file("examples_palette.dcm"))[0].pixels, want, "palette")

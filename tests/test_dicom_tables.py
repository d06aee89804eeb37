"""The gray DICOM table path (every stored value mapped once, then a gather) against the plain
float64 path it replaces: the same bytes for any 8/16-bit frame, rescale, window and inversion."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from runtime import dicom
from runtime.dicom_read import PixelLayout, Source

DTYPES = [np.uint8, np.int8, np.uint16, np.int16]


def _ds(v: float) -> str:
    return f"{v:.8g}"  # a DS value holds at most 16 characters


def _frame(arr, *, slope=None, intercept=None, window=None, bits_stored=None):
    ds = Dataset()
    if slope is not None:
        ds.RescaleSlope = _ds(slope)
    if intercept is not None:
        ds.RescaleIntercept = _ds(intercept)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = _ds(window[0]), _ds(window[1])
    bits = 8 * arr.itemsize
    pixels = PixelLayout(arr.shape[0], arr.shape[1], 1, 1, "MONOCHROME2", bits, bits_stored or bits)
    return dicom._Frame(arr, ds, 0, pixels, Source("test"))


def _plain(f, mr_range, invert):
    window = mr_range if mr_range is not None else dicom._voi_window(f)
    out = dicom._gray_plain(f, window)
    return 255 - out if invert else out


def _check(f, mr_range=None, invert=False):
    assert dicom._Codes.of(f) is not None, "an 8/16-bit frame must take the table path"
    got = dicom._gray(f, mr_range, invert)
    want = _plain(f, mr_range, invert)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert diff.max() == 0, f"{int((diff > 0).sum())} pixels differ, worst by {diff.max()}"


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1),
       slope=st.one_of(st.none(), st.floats(-8, 8, allow_nan=False).filter(lambda v: v != 0),
                       st.sampled_from([1.0, 0.5, 1 / 3, -1.0, 2.5e-4])),
       intercept=st.one_of(st.none(), st.floats(-5000, 5000, allow_nan=False), st.sampled_from([-1024.0, 0.5])),
       center=st.floats(-3000, 40000, allow_nan=False), width=st.floats(-10, 40000, allow_nan=False),
       use_window=st.booleans(), invert=st.booleans(), mr=st.booleans())
def test_table_path_equals_the_float_path(dtype, seed, slope, intercept, center, width, use_window,
                                          invert, mr):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    lo, hi = sorted(rng.integers(info.min, info.max, 2, endpoint=True))
    arr = rng.integers(lo, hi, (17, 23), endpoint=True).astype(dtype)
    f = _frame(arr, slope=slope, intercept=intercept, window=(center, width) if use_window else None)
    mr_range = None
    if mr:
        values = dicom._modality_values(f)
        mr_range = (float(values.min()) - 3.0, float(values.max()) + 1.5)
    _check(f, mr_range, invert)


def test_full_16_bit_range_and_ties():
    """Every int16 value once, with slopes that put values on .5 rounding ties."""
    arr = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16).reshape(256, 256)
    for slope, intercept, window in [(1.0, -1024.0, (40.0, 400.0)), (0.5, 0.0, None),
                                     (1 / 3, 7.25, (1000.0, 255.0)), (-2.0, 100.0, None)]:
        _check(_frame(arr, slope=slope, intercept=intercept, window=window))
        _check(_frame(arr, slope=slope, intercept=intercept, window=window), invert=True)


def test_8_bit_display_values_pass_through_and_12_bit_stretches():
    arr = np.random.default_rng(1).integers(0, 256, (32, 32)).astype(np.uint8)
    assert np.array_equal(dicom._gray(_frame(arr), None), arr)
    twelve = np.random.default_rng(2).integers(0, 4096, (32, 32)).astype(np.uint16)
    got = dicom._gray(_frame(twelve, bits_stored=12), None)
    assert got.min() == 0 and got.max() == 255
    _check(_frame(twelve, bits_stored=12))

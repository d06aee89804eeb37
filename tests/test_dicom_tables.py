"""The gray DICOM path (X-ray, MR) against its recipe written out per pixel here: the same bytes
for any 8/16-bit frame, rescale, window and inversion. (This file held a table of every stored
value to the float64 path; the table was removed, and the written-out recipe guards the bytes.)"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from medgemma_edge.runtime.dicom import convert
from medgemma_edge.runtime.dicom.frames import PixelLayout
from medgemma_edge.runtime.dicom.read import Source

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
    return convert._Frame(arr, ds, 0, pixels, Source("test"))


def _reference(f, mr_range, invert):
    """Per pixel in float64: ×slope then +intercept (pydicom's rescale order); the MR range, else
    the VOI window centre ± width/2, else the frame's own range; clip, map onto 0..255, round half
    to even. 8-bit frames with no rescale and no window are display values, kept as they are."""
    ds = f.ds
    rescaled = "RescaleSlope" in ds or "RescaleIntercept" in ds
    values = f.arr.astype(np.float64) * float(ds.get("RescaleSlope", 1.0))
    values += float(ds.get("RescaleIntercept", 0.0))
    window = mr_range
    if window is None and "WindowWidth" in ds and float(ds.WindowWidth) > 0:
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        window = (center - width / 2, center + width / 2)
    if window is None and not rescaled and f.arr.dtype == np.uint8 and f.pixels.bits_stored == 8:
        out = f.arr
    else:
        lo, hi = window or (values.min(), values.max())
        if hi > lo:
            out = np.round((np.clip(values, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)
        else:
            out = np.zeros(values.shape, np.uint8)
    return 255 - out if invert else out


def _check(f, mr_range=None, invert=False):
    got = convert._gray(f, mr_range, invert)
    want = _reference(f, mr_range, invert)
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
def test_gray_path_equals_the_recipe(dtype, seed, slope, intercept, center, width, use_window,
                                          invert, mr):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    lo, hi = sorted(rng.integers(info.min, info.max, 2, endpoint=True))
    arr = rng.integers(lo, hi, (17, 23), endpoint=True).astype(dtype)
    f = _frame(arr, slope=slope, intercept=intercept, window=(center, width) if use_window else None)
    mr_range = None
    if mr:
        values = convert._modality_values(f)
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
    assert np.array_equal(convert._gray(_frame(arr), None), arr)
    twelve = np.random.default_rng(2).integers(0, 4096, (32, 32)).astype(np.uint16)
    got = convert._gray(_frame(twelve, bits_stored=12), None)
    assert got.min() == 0 and got.max() == 255
    _check(_frame(twelve, bits_stored=12))

"""Image kernels against their plain references: resize (Pillow's C) vs numpy re-derivation,
LUT normalize vs per-pixel arithmetic, full-range table vs per-pixel formula. All exact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from medgemma_edge.kernels.full_range import full_range_u8, full_range_u8_reference
from medgemma_edge.kernels.normalize import build_lut, normalize, normalize_reference
from medgemma_edge.kernels.resize import resize_bilinear, resize_bilinear_reference, vertical_pass_first


def _worst(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    idx = np.unravel_index(int(np.argmax(d)), d.shape) if d.size else ()
    return f"max|d| = {d.max() if d.size else 0} at {idx}, {(d > 0).sum()} elements differ"


# --- resize ----------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(h=st.integers(1, 160), w=st.integers(1, 160), oh=st.integers(1, 160),
       ow=st.integers(1, 160), colour=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_resize_kernel_equals_reference(h, w, oh, ow, colour, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3) if colour else (h, w), dtype=np.uint8)
    fast, ref = resize_bilinear(img, oh, ow), resize_bilinear_reference(img, oh, ow)
    assert fast.shape == ref.shape == ((oh, ow, 3) if colour else (oh, ow))
    assert np.array_equal(fast, ref), _worst(fast, ref)


@pytest.mark.parametrize("shape,out", [
    ((2048, 2500), (896, 896)),  # landscape X-ray
    ((2500, 2048), (896, 896)),  # portrait X-ray
    ((3000, 120), (896, 896)),   # sliver: big reduction one way, enlargement the other
    ((4000, 600), (300, 300)),   # height loses > 2x the columns' loss: Pillow 13 goes vertical first
    ((60, 9000), (896, 896)),    # a wide taps count (ksize 23)
])
def test_resize_reference_on_clinical_shapes(shape, out):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    fast, ref = resize_bilinear(img, *out), resize_bilinear_reference(img, *out)
    assert np.array_equal(fast, ref), f"{shape} -> {out}: " + _worst(fast, ref)


def test_pass_order_rule_matters(monkeypatch):
    # The order of Pillow's two passes changes pixels; flipping our rule must break the match,
    # in both directions (a vertical-first shape and a horizontal-first one).
    import medgemma_edge.kernels.resize as resize

    rng = np.random.default_rng(1)
    for shape, out in [((400, 60), (50, 40)), ((60, 400), (40, 50))]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        pillow = resize_bilinear(img, *out)
        assert np.array_equal(pillow, resize_bilinear_reference(img, *out))
        chosen = vertical_pass_first(*shape, *out)
        with monkeypatch.context() as m:
            m.setattr(resize, "vertical_pass_first", lambda *a, c=chosen: not c)
            assert not np.array_equal(pillow, resize_bilinear_reference(img, *out)), (shape, out)


@settings(max_examples=80, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), oh=st.integers(1, 300), ow=st.integers(1, 300),
       colour=st.booleans(), threads=st.integers(2, 5), seed=st.integers(0, 2**32 - 1))
def test_banded_resize_equals_pillow(h, w, oh, ow, colour, threads, seed):
    """Rows in bands, then columns in bands (or the reverse, as Pillow orders its passes): the
    same bytes as one Pillow resize, including bands of a single row or none at all."""
    from medgemma_edge.kernels.resize import _resize_banded

    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3) if colour else (h, w), dtype=np.uint8)
    whole = resize_bilinear(img, oh, ow)
    banded = _resize_banded(img, oh, ow, threads)
    assert np.array_equal(banded, whole), _worst(banded, whole)


@pytest.mark.parametrize("shape,out", [((2048, 2500), (896, 896)), ((2500, 2500), (896, 896)),
                                       ((4000, 600), (300, 300)), ((1100, 1024, 3), (896, 896))])
def test_threaded_resize_on_clinical_shapes(shape, out, monkeypatch):
    import medgemma_edge.kernels.resize as resize

    img = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    banded = []
    real = resize._resize_banded
    monkeypatch.setattr(resize, "_resize_banded", lambda *a: banded.append(1) or real(*a))
    whole, threaded = resize_bilinear(img, *out), resize_bilinear(img, *out, threads=2)
    assert banded, "the threaded call did not take the banded path"
    assert np.array_equal(threaded, whole), f"{shape} -> {out}: " + _worst(threaded, whole)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 120), w=st.integers(1, 120), size=st.integers(1, 120),
       seed=st.integers(0, 2**32 - 1))
def test_gray_plane_resize_equals_each_rgb_channel(h, w, size, seed):
    gray = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(gray).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    one = resize_bilinear(gray, size, size)
    for c in range(3):
        assert np.array_equal(one, rgb[:, :, c]), _worst(one, rgb[:, :, c])


def test_resize_rejects_wrong_input():
    with pytest.raises(ValueError):
        resize_bilinear(np.zeros((4, 4), np.float32), 2, 2)
    with pytest.raises(ValueError):
        resize_bilinear_reference(np.zeros((4, 4, 4), np.uint8), 2, 2)


# --- normalize -------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), colour=st.booleans(),
       per_channel=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_normalize_kernel_equals_reference(h, w, colour, per_channel, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3) if colour else (h, w), dtype=np.uint8)
    mean = [0.48, 0.5, 0.52] if per_channel else 0.5
    std = [0.25, 0.5, 0.27] if per_channel else 0.5
    fast = normalize(img, build_lut(1 / 255, mean, std))
    ref = normalize_reference(img, 1 / 255, mean, std)
    assert fast.shape == ref.shape == (3, h, w) and fast.dtype == np.float32
    assert np.array_equal(fast, ref), _worst(fast, ref)


def test_lut_equals_transformers_arithmetic():
    import transformers.image_transforms as transforms

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)  # (H, W, C)
    ref = transforms.normalize(transforms.rescale(levels, 1 / 255), mean=[0.5] * 3, std=[0.5] * 3)
    lut = build_lut(1 / 255, 0.5, 0.5)  # (3, 256)
    assert np.array_equal(lut[0].reshape(16, 16), ref[:, :, 0]), _worst(lut[0].reshape(16, 16), ref[:, :, 0])


def test_normalize_writes_into_given_slot():
    out = np.zeros((2, 3, 4, 5), np.float32)
    normalize(np.full((4, 5), 255, np.uint8), build_lut(1 / 255, 0.5, 0.5), out=out[1])
    assert (out[1] == 1.0).all() and (out[0] == 0).all()


# --- full range ------------------------------------------------------------------------------

_DTYPES = ["uint16", ">u2", "int16", "int32", "uint32", "int64", "float32", "float64", "uint8"]


@settings(max_examples=120, deadline=None)
@given(dtype=st.sampled_from(_DTYPES), h=st.integers(1, 30), w=st.integers(1, 30),
       span=st.sampled_from([0, 1, 255, 4095, 65535, 10**6]), seed=st.integers(0, 2**32 - 1))
def test_full_range_kernel_equals_reference(dtype, h, w, span, seed):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    lo = 0 if info is None or info.min == 0 else -min(span, -info.min) // 2
    hi = lo + span if info is None else min(lo + span, info.max)
    values = rng.integers(lo, hi + 1, (h, w)) if hi > lo else np.full((h, w), lo)
    if info is None:
        values = values * 0.37 - 5.0
    arr = values.astype(dtype)
    fast, ref = full_range_u8(arr), full_range_u8_reference(arr)
    assert fast.dtype == np.uint8 and fast.shape == arr.shape
    assert np.array_equal(fast, ref), f"{dtype}: " + _worst(fast, ref)


def test_full_range_ends_and_specials():
    a = np.array([[100, 4195, 2148, 2149]], np.uint16)  # range 4095: 2048 / 4095 * 255 = 127.53
    assert full_range_u8(a).tolist() == [[0, 255, 128, 128]]
    f = np.array([[np.nan, -np.inf, 0.0, 1.0, np.inf]], np.float32)
    assert full_range_u8(f).tolist() == [[0, 0, 0, 255, 255]]
    assert full_range_u8(np.full((2, 2), 7, np.uint16)).max() == 0  # constant -> black
    assert full_range_u8(np.full((2, 2), np.nan, np.float32)).max() == 0


def test_full_range_is_monotone_on_16_bit():
    codes = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = full_range_u8(codes).ravel()
    assert out[0] == 0 and out[-1] == 255 and (np.diff(out.astype(int)) >= 0).all()


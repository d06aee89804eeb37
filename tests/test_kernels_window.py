"""kernels/window.py: the table kernel equals the float reference byte for byte, and the
reference equals the recipe (Google's CT notebook arithmetic) written out here once more."""

import numpy as np
import pytest

from medgemma_edge.kernels.window import apply_windows, stored_to_hu, window_reference, window_table

MEDGEMMA = ((-1024, 1024), (-135, 215), (0, 80))


def assert_same(got: np.ndarray, want: np.ndarray, what: str):
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    if diff.any():
        where = np.unravel_index(diff.argmax(), diff.shape)
        pytest.fail(f"{what}: {int((diff > 0).sum())} of {diff.size} values differ, worst "
                    f"{int(diff.max())} at {tuple(int(i) for i in where)}")


def notebook_window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    # Google's high_dimensional_ct notebook, step for step.
    x = np.clip(hu, lo, hi)
    x = x.astype(np.float32)
    x -= lo
    x /= (hi - lo)
    x *= 255.0
    return np.round(x, 0).astype(np.uint8)


def test_reference_is_the_notebook_recipe():
    hu = np.linspace(-3000, 3000, 60001)  # steps of 0.1 HU, ties included
    want = np.stack([notebook_window(hu, lo, hi) for lo, hi in MEDGEMMA], axis=-1)
    assert_same(window_reference(hu, MEDGEMMA), want, "reference vs notebook")


def test_reference_ends_and_a_known_value():
    out = window_reference(np.array([-5000.0, -1024.0, 0.0, 40.0, 80.0, 5000.0]), MEDGEMMA)
    assert out[0].tolist() == [0, 0, 0] and out[-1].tolist() == [255, 255, 255]
    assert out[1].tolist() == [0, 0, 0]
    # 40 HU: R (1064/2048·255 = 132.49 → 132), G (175/350·255 = 127.5 → 128, half to even),
    # B (40/80·255 = 127.5 → 128).
    assert out[3].tolist() == [132, 128, 128]
    assert out[4].tolist() == [137, 157, 255]  # 1104/2048·255 = 137.46, 215/350·255 = 156.6


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int8, np.uint8])
@pytest.mark.parametrize("slope,intercept", [(1.0, -1024.0), (1.0, 0.0), (0.5, -1024.25),
                                             (2.5, 3.0)])
def test_table_equals_reference_on_every_stored_value(dtype, slope, intercept):
    info = np.iinfo(dtype)
    every = np.arange(info.min, info.max + 1).astype(dtype)  # exhaustive: all 2**bits values
    want = window_reference(stored_to_hu(every, slope, intercept), MEDGEMMA)
    assert_same(apply_windows(every, MEDGEMMA, slope, intercept), want,
                f"{np.dtype(dtype).name} slope {slope} intercept {intercept}")


def test_volume_shape_big_endian_and_custom_windows():
    rng = np.random.default_rng(0)
    vol = rng.integers(-1100, 3000, size=(5, 64, 48)).astype(np.int16)  # (D, H, W)
    windows = ((-1350, 150), (-160.5, 240.25), (20, 60))
    want = window_reference(stored_to_hu(vol, 1.0, -1024.0), windows)
    got = apply_windows(vol, windows, 1.0, -1024.0)
    assert got.shape == (5, 64, 48, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
    assert_same(got, want, "int16 volume")
    assert_same(apply_windows(vol.astype(">i2"), windows, 1.0, -1024.0), want, "big endian")
    assert_same(apply_windows(vol[:, ::2, 1::3], windows, 1.0, -1024.0), want[:, ::2, 1::3],
                "strided view")


@pytest.mark.parametrize("shape", [(1,), (3,), (5, 7), (3, 7, 5), (2, 131075)])
def test_any_length_including_a_tail_of_fewer_than_four_pixels(shape):
    # The gather repacks 4 pixels at a time and chunks the volume: lengths off by 1..3 and
    # over one chunk must come out the same.
    rng = np.random.default_rng(1)
    vol = rng.integers(-32768, 32768, size=shape).astype(np.int16)
    want = window_reference(stored_to_hu(vol, 1.0, -1024.0), MEDGEMMA)
    assert_same(apply_windows(vol, MEDGEMMA, 1.0, -1024.0), want, f"shape {shape}")
    two = ((-100, 100), (0, 50))  # not three channels: the general gather
    assert_same(apply_windows(vol, two), window_reference(stored_to_hu(vol), two), "2 windows")


def test_wide_and_float_data_fall_back_to_the_reference():
    vol = np.array([[-2000, -1024, 0, 70000]], dtype=np.int32)
    assert_same(apply_windows(vol, MEDGEMMA, 1.0, 0.0), window_reference(vol, MEDGEMMA), "int32")
    hu = np.array([[-1024.5, 17.25, 300.0]], dtype=np.float32)
    assert_same(apply_windows(hu, MEDGEMMA), window_reference(hu.astype(np.float64), MEDGEMMA),
                "float32")


def test_table_is_cached_and_read_only():
    a = window_table(MEDGEMMA, 1.0, -1024.0, np.int16)
    b = window_table([list(w) for w in MEDGEMMA], 1, -1024, np.dtype(">i2"))
    assert a is b and a.shape == (65536, 3) and not a.flags.writeable
    with pytest.raises(ValueError):
        window_table(MEDGEMMA, dtype=np.int32)

"""runtime.preprocess against transformers: the same FILE through our path (load_pictures ->
model_view -> normalize_views) and through transformers' load_image + Gemma3ImageProcessor must
give the same float32 tensor.

Tolerance: max |difference| <= 1e-6 (in practice 0: the arithmetic is reproduced exactly).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.images import load_image
from medgemma_edge.runtime.picture import Picture
from medgemma_edge.runtime.sources import load_pictures
from medgemma_edge.runtime.preprocess import (DEFAULT_FIT, IMAGE_SIZE, fit_square, model_view,
                                              normalize_views)
from tests.imagegen import eight_bit_files, smooth_rgb

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return eight_bit_files(tmp_path_factory.mktemp("eight_bit"))


def _processor(size=IMAGE_SIZE):
    import transformers

    return transformers.Gemma3ImageProcessor(
        size={"height": size, "width": size}, resample=Image.Resampling.BILINEAR,
        rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False,
    )


def _hf(processor, image: Image.Image) -> np.ndarray:
    # Channels-last stated outright: transformers guesses the layout of arrays whose first side is
    # 1 or 3 pixels as channels-first and fails on them (a transformers quirk, not our concern).
    out = processor(image, return_tensors="np", input_data_format="channels_last")
    return out["pixel_values"]  # (1, 3, S, S) float32


def _pad_with_pillow(image: Image.Image) -> Image.Image:
    w, h = image.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def _compare(files, ours_fn, ref_fn) -> list[tuple[float, str]]:
    diffs = []
    for desc, path in files:
        ours, ref = ours_fn(path), ref_fn(path)
        assert ours.shape == ref.shape, f"{desc}: shape {ours.shape} vs {ref.shape}"
        assert ours.dtype == np.float32
        diffs.append((float(np.abs(ours.astype(np.float64) - ref).max()), desc))
    return sorted(diffs, reverse=True)


def _report(diffs, what):
    worst, desc = diffs[0]
    print(f"\n{what}: {len(diffs)} files, worst max|d| = {worst:.3g} ({desc})")
    bad = [f"{d:.3g} {name}" for d, name in diffs if d > TOLERANCE]
    assert not bad, f"{what}: {len(bad)} files over {TOLERANCE}: " + "; ".join(bad)


def test_enough_cases(files):
    modes = {Image.open(path).mode for _, path in files}
    assert len(files) >= 30
    assert {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK"} <= modes, modes


def test_stretch_equals_transformers(files):
    from transformers.image_utils import load_image as hf_load_image

    processor = _processor()
    diffs = _compare(files,
                     lambda p: normalize_views(model_view(load_pictures(str(p)), fit="stretch")),
                     lambda p: _hf(processor, hf_load_image(str(p))))
    _report(diffs, "stretch vs Gemma3ImageProcessor")


def test_pad_equals_pillow_pad_then_transformers(files):
    from transformers.image_utils import load_image as hf_load_image

    processor = _processor()
    diffs = _compare(files,
                     lambda p: normalize_views(model_view(load_pictures(str(p)), fit="pad")),
                     lambda p: _hf(processor, _pad_with_pillow(hf_load_image(str(p)))))
    _report(diffs, "pad vs Pillow pad + Gemma3ImageProcessor")


@pytest.mark.parametrize("size", [224, 448])
def test_other_sizes_equal_transformers(files, size):
    from transformers.image_utils import load_image as hf_load_image

    processor = _processor(size)
    few = files[::6]
    diffs = _compare(few,
                     lambda p: normalize_views(model_view(load_pictures(str(p)), size=size, fit="stretch")),
                     lambda p: _hf(processor, hf_load_image(str(p))))
    _report(diffs, f"stretch at {size}")


def test_default_fit_is_pad():
    assert DEFAULT_FIT == "pad"


def test_fit_square_centres_on_black():
    img = np.full((3, 8, 3), 200, np.uint8)  # 8 wide, 3 tall: 5 rows of padding, 2 above, 3 below
    square = fit_square(img, "pad")
    assert square.shape == (8, 8, 3)
    assert (square[2:5] == 200).all()
    assert (square[:2] == 0).all() and (square[5:] == 0).all()
    tall = fit_square(np.full((7, 2), 9, np.uint8), "pad")  # gray plane, 5 columns: 2 left, 3 right
    assert tall.shape == (7, 7) and (tall[:, 2:4] == 9).all() and tall[:, :2].sum() == 0
    assert fit_square(img, "stretch") is img


def test_gray_view_gray_copy_and_plane_agree(monkeypatch):
    import medgemma_edge.runtime.preprocess as preprocess

    gray = smooth_rgb(123, 77, seed=5)[:, :, 1]
    view = np.broadcast_to(gray[:, :, None], gray.shape + (3,))  # what runtime.images returns
    copied = np.repeat(gray[:, :, None], 3, axis=2)  # what another loader might produce
    a = normalize_views(model_view([view], size=96))
    assert np.array_equal(a, normalize_views(model_view([copied], size=96)))
    assert np.array_equal(a, normalize_views(model_view([gray], size=96)))
    assert np.array_equal(model_view(view, 96), model_view(copied, 96))
    assert model_view(view, 96)[0].shape == (96, 96, 3)
    # Both gray forms reach the resize kernel as one plane; a colour picture as three.
    seen = []
    real = preprocess.resize_bilinear
    monkeypatch.setattr(preprocess, "resize_bilinear",
                        lambda p, h, w, threads=1: seen.append(p.ndim) or real(p, h, w, threads=threads))
    model_view([view, copied, smooth_rgb(123, 77, seed=5)], size=32)
    assert sorted(seen) == [2, 2, 3]


def test_batch_of_pictures_and_model_view_agree():
    pics = [Picture(load_image(smooth_rgb(50 + 10 * i, 40, seed=i)), f"SLICE {i + 1}")
            for i in range(3)]
    batch = normalize_views(model_view(pics, size=64))
    views = model_view(pics, size=64)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == np.float32
    assert views.shape == (3, 64, 64, 3) and views.dtype == np.uint8
    # The float tensor is exactly the uint8 view normalized: (v / 255 - 0.5) / 0.5.
    from_views = ((views.astype(np.float64) / 255).astype(np.float32) - 0.5) / np.float32(0.5)
    assert np.array_equal(batch, from_views.transpose(0, 3, 1, 2))


def test_bad_arguments_are_input_errors():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(InputError, match="unknown fit"):
        model_view([img], fit="crop")
    with pytest.raises(InputError, match="an integer from 1 to"):
        model_view([img], size=0)
    with pytest.raises(InputError, match="no pictures"):
        model_view([])
    with pytest.raises(InputError, match="uint8"):
        model_view([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(InputError, match="uint8"):
        model_view([np.zeros((4, 4, 4), np.uint8)])
    with pytest.raises(InputError, match=r"\(N, S, S, 3\)"):
        normalize_views(np.zeros((4, 4, 3), np.uint8))  # one view, not a batch of them
    with pytest.raises(InputError, match=r"\(N, S, S, 3\)"):
        normalize_views(np.zeros((1, 3, 4, 4), np.float32))


def test_threads_change_nothing_but_speed(monkeypatch):
    """A series resizes slice by slice on threads, a single big picture in bands: the bytes equal
    the one-thread result, and threads=None is the machine's one thread policy."""
    import medgemma_edge.runtime.preprocess as preprocess

    series = [smooth_rgb(70 + 9 * i, 50 + 4 * i, seed=i) for i in range(7)]
    series[3] = series[3][:, :, 0]  # a gray slice among colour ones
    one = model_view(series, size=48, threads=1)
    for threads in (2, 3, 16):
        assert np.array_equal(model_view(series, size=48, threads=threads), one), threads
    big = np.random.default_rng(0).integers(0, 256, (1200, 1000), dtype=np.uint8)  # >= 1 MPixel: banded
    assert np.array_equal(model_view(big, size=300, threads=3), model_view(big, size=300, threads=1))
    asked = []
    monkeypatch.setattr(preprocess, "resolve_threads", lambda t: asked.append(t) or 1)
    model_view(series, size=16)
    assert asked == [None]

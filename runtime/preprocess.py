"""Pictures -> exactly the pixels MedGemma's vision tower takes: fit to square, resize, normalize.

The one preprocessing path: every backend gets its images from here (see ARCHITECTURE.md).

    fit      'pad' (default) centres the picture on a black square; 'stretch' squashes it
    resize   Pillow-exact antialiased bilinear to size x size (kernels.resize)
    normalize  x / 255, then (x - 0.5) / 0.5, float32 channels-first (kernels.normalize)

With fit='stretch' the result equals transformers' Gemma3ImageProcessor (size 896, bilinear,
do_pan_and_scan False) on the same file bit for bit; tests/test_preprocess.py holds it there.

Why 'pad' is the default: Google's MedGemma serving code and notebooks pad to a square with black
before resizing ("as in training"), and padding keeps shapes true: stretching a 2500x2048 film to
a square makes every structure 18% narrower for its height, so a round nodule turns oval. The
transformers processor stretches only because it is Gemma 3's generic image path; use
fit='stretch' to reproduce the transformers pipeline exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kernels.normalize import build_lut, normalize
from kernels.resize import resize_bilinear
from runtime.errors import InputError

IMAGE_SIZE = 896  # SigLIP input of every MedGemma: 64 x 64 patches of 14 pixels
RESCALE = 1 / 255  # transformers' rescale_factor for MedGemma
IMAGE_MEAN = 0.5  # preprocessor_config.json: image_mean [0.5, 0.5, 0.5]
IMAGE_STD = 0.5  # preprocessor_config.json: image_std [0.5, 0.5, 0.5]
FITS = ("pad", "stretch")
DEFAULT_FIT = "pad"
MAX_THREADS = 8  # a series rarely gains beyond this; the machine runs the model too


def fit_square(pixels: np.ndarray, fit: str = DEFAULT_FIT) -> np.ndarray:
    """(H, W[, 3]) uint8 -> the picture the resize should see: a black-padded square for 'pad',
    the picture itself for 'stretch' (the resize squashes it)."""
    _check_fit(fit)
    if fit == "stretch":
        return pixels
    h, w = pixels.shape[:2]
    side = max(h, w)
    if h == w:
        return pixels
    # Odd differences put the extra black row/column at the bottom/right, as Google's code does.
    top, left = (side - h) // 2, (side - w) // 2
    square = np.zeros((side, side) + pixels.shape[2:], dtype=pixels.dtype)
    square[top:top + h, left:left + w] = pixels
    return square


def resize_square(pixels: np.ndarray, size: int = IMAGE_SIZE, fit: str = DEFAULT_FIT) -> np.ndarray:
    """One picture -> (size, size, 3) uint8 RGB: what the model sees, before normalization."""
    resized = _resize_planes(pixels, size, fit, _threads(1))
    if resized.ndim == 3:
        return resized
    rgb = np.empty((size, size, 3), dtype=np.uint8)
    rgb[...] = resized[:, :, None]
    return rgb


def to_model_input(pictures, size: int = IMAGE_SIZE, fit: str = DEFAULT_FIT,
                   mean: float | Sequence[float] = IMAGE_MEAN,
                   std: float | Sequence[float] = IMAGE_STD) -> np.ndarray:
    """Pictures (a list of runtime.inputs.Picture or arrays, or one of them) -> float32
    (N, 3, size, size): what the vision tower receives."""
    items = _as_list(pictures)
    _check_fit(fit)
    _check_size(size)
    lut = build_lut(RESCALE, mean, std, channels=3)
    batch = np.empty((len(items), 3, size, size), dtype=np.float32)  # (N, 3, S, S)
    threads = _threads(len(items))
    _each(lambda i: normalize(_resize_planes(items[i], size, fit, threads), lut, out=batch[i]), len(items))
    return batch


def model_view(pictures, size: int = IMAGE_SIZE, fit: str = DEFAULT_FIT) -> np.ndarray:
    """The same pictures as uint8 (N, size, size, 3): what the model sees, for previews."""
    items = _as_list(pictures)
    _check_fit(fit)
    _check_size(size)
    views = np.empty((len(items), size, size, 3), dtype=np.uint8)  # (N, S, S, 3)

    threads = _threads(len(items))

    def one(i):
        resized = _resize_planes(items[i], size, fit, threads)
        views[i] = resized[:, :, None] if resized.ndim == 2 else resized

    _each(one, len(items))
    return views


def _each(fn, n: int) -> None:
    """fn(0..n-1), on threads for a series: Pillow releases the GIL while it resizes, so the
    slices of a CT series resize in parallel. Each call writes its own slot of the output."""
    workers = min(n, os.cpu_count() or 1, MAX_THREADS)
    if workers <= 1:
        for i in range(n):
            fn(i)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, range(n)))  # list() re-raises the first error here


def _threads(n_items: int) -> int:
    """Threads inside one resize: all cores for a single picture; a series is parallel over its
    slices instead (`_each`), one thread each."""
    return min(os.cpu_count() or 1, MAX_THREADS) if n_items == 1 else 1


def _resize_planes(pixels: np.ndarray, size: int, fit: str, threads: int = 1) -> np.ndarray:
    """(size, size) for a gray picture (one plane resized: a third of the work, same pixels as
    each channel of the RGB resize), (size, size, 3) for a colour one."""
    _check_fit(fit)
    _check_size(size)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        raise InputError("pictures must be uint8 numpy arrays — load them with "
                         "runtime.inputs.load_pictures")
    plane = _gray_plane(pixels)
    src = plane if plane is not None else _rgb(pixels)
    return resize_bilinear(fit_square(src, fit), size, size, threads=threads)


def _gray_plane(pixels: np.ndarray) -> np.ndarray | None:
    """The single plane of a gray picture, or None for a colour one.

    runtime.images hands gray pictures over as a zero-stride view (free to detect); other
    sources (DICOM, arrays) may repeat a plane into three real channels, which costs two
    comparisons to detect and saves two thirds of the resize.
    """
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        if pixels.strides[2] == 0:
            return pixels[:, :, 0]
        first = pixels[:, :, 0]
        # Colour pictures usually differ in the first rows: look there before scanning it all.
        if (np.array_equal(first[:8], pixels[:8, :, 1]) and np.array_equal(first, pixels[:, :, 1])
                and np.array_equal(first, pixels[:, :, 2])):
            return first
    return None


def _rgb(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise InputError(
            f"a picture must be (H, W, 3) uint8 RGB, got {pixels.shape} {pixels.dtype} — load it "
            "with runtime.images.load_image"
        )
    return pixels


def _as_list(pictures) -> list[np.ndarray]:
    if isinstance(pictures, np.ndarray) or hasattr(pictures, "pixels"):
        pictures = [pictures]
    items = [getattr(p, "pixels", p) for p in pictures]
    if not items:
        raise InputError("no pictures to preprocess — pass at least one image")
    return items


def _check_fit(fit: str) -> None:
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r} — use one of {', '.join(FITS)}")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"image size must be a positive integer, got {size!r}")

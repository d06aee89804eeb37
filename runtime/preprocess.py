"""Pictures -> exactly the pixels MedGemma's vision tower takes. The one preprocessing path: every
backend, the CLI and the benchmarks get their images from `model_view` (see ARCHITECTURE.md).

    model_view      fit to a square, then Pillow-exact antialiased bilinear resize to size x size
                    (kernels.resize): uint8 (N, S, S, 3), what llama.cpp's mtmd takes as is
    normalize_views x / 255, then (x - mean) / std, float32 channels-first (kernels.normalize):
                    a step of the vision backends that take floats (ONNX) and of `preprocess`

With fit='stretch', normalize_views(model_view(...)) equals transformers' Gemma3ImageProcessor
(size 896, bilinear, do_pan_and_scan False) on the same file bit for bit;
tests/test_preprocess.py holds it there.

Why 'pad' is the default: Google's MedGemma serving code and notebooks pad to a square with black
before resizing ("as in training"), and padding keeps shapes true: stretching a 2500x2048 film to
a square narrows every structure to 2048/2500 of its width for its height, so a round nodule
turns oval. The transformers processor stretches only because it is Gemma 3's generic image path;
use fit='stretch' to reproduce the transformers pipeline exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medgemma_edge.kernels import bands
from medgemma_edge.kernels.normalize import build_lut, normalize
from medgemma_edge.kernels.resize import resize_bilinear
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.machine import resolve_threads

IMAGE_SIZE = 896  # SigLIP input of every MedGemma: 64 x 64 patches of 14 pixels
MAX_SIZE = 4096  # sides beyond this are no vision tower's input; the bound keeps memory finite
MAX_VIEW_BYTES = 2 << 30  # all views of one call (85 slices at 896² are 205 MB)
RESCALE = 1 / 255  # transformers' rescale_factor for MedGemma
IMAGE_MEAN = 0.5  # preprocessor_config.json: image_mean [0.5, 0.5, 0.5]
IMAGE_STD = 0.5  # preprocessor_config.json: image_std [0.5, 0.5, 0.5]
FITS = ("pad", "stretch")
DEFAULT_FIT = "pad"
FIT_HELP = f"how a picture becomes square: {' or '.join(FITS)} (default {DEFAULT_FIT})"


def model_view(pictures, size: int = IMAGE_SIZE, fit: str = DEFAULT_FIT,
               threads: int | None = None) -> np.ndarray:
    """Pictures (runtime Pictures or uint8 arrays; a list, or one) -> uint8 (N, size, size, 3):
    what the model sees.

    `threads` (None: the machine's physical cores, runtime.machine) goes where the work is: the
    slices of a series resize side by side, one per thread; a single picture resizes in bands
    (kernels.bands). Pillow releases the GIL while it resamples, so both use the cores, and each
    resize writes its own slot, so the bytes do not depend on `threads`.
    """
    items = _as_list(pictures)
    _check_fit(fit)
    _check_size(size, len(items))
    threads = resolve_threads(threads)
    views = np.empty((len(items), size, size, 3), dtype=np.uint8)  # (N, S, S, 3)

    def resize(i: int, inner_threads: int) -> None:
        resized = _resize(items[i], size, fit, inner_threads)  # (S, S) gray or (S, S, 3)
        views[i] = resized[:, :, None] if resized.ndim == 2 else resized

    if len(items) == 1:
        resize(0, threads)
    else:
        bands.run_bands(lambda a, b: [resize(i, 1) for i in range(a, b)], len(items), threads)
    return views


def normalize_views(views: np.ndarray, mean: float | Sequence[float] = IMAGE_MEAN,
                    std: float | Sequence[float] = IMAGE_STD) -> np.ndarray:
    """uint8 (N, S, S, 3) views from `model_view` -> float32 (N, 3, S, S): (x / 255 - mean) / std,
    rounded as transformers rounds it (kernels.normalize), per channel when mean/std are lists."""
    views = np.asarray(views)
    if views.dtype != np.uint8 or views.ndim != 4 or views.shape[3] != 3:
        raise InputError(f"views must be uint8 (N, S, S, 3), got {views.dtype} {views.shape} — "
                         "make them with runtime.preprocess.model_view")
    lut = build_lut(RESCALE, mean, std, channels=3)  # (3, 256)
    n, h, w = views.shape[:3]
    batch = np.empty((n, 3, h, w), dtype=np.float32)  # (N, 3, S, S)
    for i in range(n):
        normalize(views[i], lut, out=batch[i])
    return batch


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


def _resize(pixels: np.ndarray, size: int, fit: str, threads: int) -> np.ndarray:
    """(size, size) for a gray picture, (size, size, 3) for a colour one. A gray X-ray resized as
    one plane does a third of the RGB resize's work and gives the same bytes as each channel of it
    (tests/test_kernels_image.py; timed by `python -m benchmarks.bench_preprocess`)."""
    plane = _gray_plane(pixels)
    src = plane if plane is not None else pixels
    return resize_bilinear(fit_square(src, fit), size, size, threads=threads)


def _gray_plane(pixels: np.ndarray) -> np.ndarray | None:
    """The single plane of a gray picture, or None for a colour one.

    runtime.images and runtime.dicom hand gray pictures over as a channel-stride-0 view, free to
    detect. Files that store gray as RGB (common for exported X-rays) take two comparisons of the
    planes, far cheaper than the two plane resizes they save; a colour picture differs in its first
    rows, so it stops there.
    """
    if pixels.ndim == 2:
        return pixels
    if pixels.strides[2] == 0:
        return pixels[:, :, 0]
    first = pixels[:, :, 0]
    if (np.array_equal(first[:8], pixels[:8, :, 1]) and np.array_equal(first, pixels[:, :, 1])
            and np.array_equal(first, pixels[:, :, 2])):
        return first
    return None


def _as_list(pictures) -> list[np.ndarray]:
    """Checked here, on the caller's thread, so a bad picture is refused before any pool starts."""
    if isinstance(pictures, np.ndarray) or hasattr(pictures, "pixels"):
        pictures = [pictures]
    items = [getattr(p, "pixels", p) for p in pictures]
    if not items:
        raise InputError("no pictures to preprocess — pass at least one image")
    for pixels in items:
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or not (
                pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
            got = f"{pixels.shape} {pixels.dtype}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
            raise InputError(f"a picture must be (H, W, 3) uint8 RGB or (H, W) uint8 gray, got {got} — "
                             "load it with medgemma_edge.runtime.sources.load_pictures")
    return items


def _check_fit(fit: str) -> None:
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r} — use one of {', '.join(FITS)}")


def _check_size(size: int, n: int = 1) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not 1 <= size <= MAX_SIZE:
        raise InputError(f"image size must be an integer from 1 to {MAX_SIZE}, got {size!r:.40} — "
                         f"MedGemma takes {IMAGE_SIZE}")
    if n * size * size * 3 > MAX_VIEW_BYTES:
        raise InputError(f"{n} pictures of {size}×{size} would need {n * size * size * 3 / 2**30:.1f} GiB — "
                         "use fewer slices (--max-slices) or a smaller --size")

"""Decode one ordinary picture (PNG, JPEG, BMP, TIFF, WebP; path, bytes, PIL image or array)
into uint8 RGB pixels, or refuse it with one line that says what to do.

8-bit pictures come out exactly as transformers' `load_image` makes them (EXIF orientation
applied, then Pillow's convert("RGB"): alpha dropped, palette expanded, CMYK converted), because
that is what the model was run on. 16-bit, 32-bit and float pictures are the deliberate exception:
they are stretched by their own min..max to 0..255 (kernels.full_range) where Pillow would clip
everything above 255 and white out a 12-bit X-ray.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medgemma_edge.kernels.full_range import full_range_u8
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.files import read_bytes, shown

# Pillow's default Image.MAX_IMAGE_PIXELS (about 9459 x 9459). We hold every picture to it even
# when a caller has raised or removed Pillow's own limit: a clinic runtime has no business
# decoding a 100-megapixel file, and a tiny file that claims to be one is an attack. DICOM
# frames are held to the same limit (runtime/dicom/frames.py).
MAX_PIXELS = 89_478_485

FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
# Pillow names some files in these formats differently: phone JPEGs open as MPO, headerless BMP as DIB.
_FORMAT_ALIASES = {"MPO": "JPEG", "DIB": "BMP"}

# Modes Pillow's convert("RGB") handles the way transformers relies on.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
GRAY_MODES = ("1", "L", "LA")  # convert("RGB") repeats one plane three times: keep one
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def load_image(src) -> np.ndarray:
    """Path, bytes, PIL image or numpy array -> (H, W, 3) uint8 RGB.

    A gray picture comes back as a read-only view that shows one (H, W) plane as three channels
    without copying it (channel stride 0); `runtime.preprocess` sees that for free and resizes the
    one plane instead of three. Use np.array(result) if you need to write to it.
    """
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, Image.Image):
        _check_size(src.size, "the picture")
        try:
            image = ImageOps.exif_transpose(src)  # a copy: the caller's image is left alone
        except Exception as err:  # a lazily opened image decodes here
            raise InputError(f"the picture cannot be decoded ({_one_line(err)}) — "
                             "re-export or copy it again") from None
        return _from_pil(image, "the picture")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(src)), "the image bytes")
    if isinstance(src, (str, os.PathLike)):
        return _decode(io.BytesIO(read_bytes(src)), shown(src))  # regular files only, bounded
    raise InputError(
        f"cannot read a picture from {type(src).__name__} — pass a file path, bytes, a PIL image "
        "or a numpy array"
    )


def _decode(fh, name: str) -> np.ndarray:
    with out_of_memory_as_input_error(name):
        return _decode_image(fh, name)


@contextlib.contextmanager
def out_of_memory_as_input_error(name: str):
    """MemoryError anywhere while decoding → one line (the limits make it rare: a machine low on
    memory, or a picture just under them)."""
    try:
        yield
    except MemoryError:
        raise InputError(f"{name}: there is not enough memory to decode it — close other "
                         f"programs, or pass a smaller picture or fewer slices (--max-slices)"
                         ) from None


def _decode_image(fh, name: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice its limit; we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fh)
            fmt = _FORMAT_ALIASES.get(image.format, image.format)
            if fmt not in FORMATS:
                raise InputError(
                    f"{name}: {image.format} pictures are not supported — convert it to PNG "
                    f"(supported: {', '.join(FORMATS)})"
                )
            _check_size(image.size, name)
            image.load()
    except (InputError, MemoryError):
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InputError(
            f"{name}: refused as a possible decompression bomb (over Pillow's limit of "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels) — downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise InputError(
            f"{name}: not a picture Pillow can read — supply a {', '.join(FORMATS)} file or DICOM"
        ) from None
    except Exception as err:  # Pillow reports corrupt data with many exception types
        reason = _one_line(err)
        hint = "re-export or copy it again"
        if "truncated" in reason.lower():
            raise InputError(f"{name}: the file is truncated (Pillow: {reason}) — {hint}") from None
        raise InputError(f"{name}: corrupt picture data (Pillow: {reason}) — {hint}") from None
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except MemoryError:
        raise
    except Exception as err:
        raise InputError(f"{name}: unreadable EXIF orientation ({_one_line(err)}) — re-save it "
                         "without EXIF") from None
    return _from_pil(image, name)


def _from_pil(image: Image.Image, name: str) -> np.ndarray:
    mode = image.mode
    if mode in GRAY_MODES:
        gray = image if mode == "L" else image.convert("L")
        return _as_rgb_view(np.asarray(gray))
    if mode in EIGHT_BIT_MODES:
        return np.asarray(image.convert("RGB"))
    if mode in HIGH_DEPTH_MODES:
        return _as_rgb_view(full_range_u8(np.asarray(image)))
    raise InputError(
        f"{name}: pixel mode {mode!r} is not supported — save it as 8-bit RGB or gray, or "
        "16-bit gray, PNG or TIFF"
    )


def _from_array(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)):
        raise InputError(
            f"an array picture must be (H, W) gray or (H, W, 3) RGB (alpha allowed), got shape "
            f"{a.shape} — reshape it"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"the picture is empty ({a.shape[0]}x{a.shape[1]}) — pass a real image")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255  # what Pillow's mode "1" becomes
    if a.dtype.kind not in "uif":
        raise InputError(f"array pixels of type {a.dtype} are not supported — use uint8, uint16 or float")
    if a.ndim == 3 and a.shape[2] in (2, 4):
        a = a[:, :, : a.shape[2] - 1]  # drop alpha, as convert("RGB") does
    if a.dtype != np.uint8:
        a = full_range_u8(a)  # one range over all channels keeps colours in proportion
    if a.ndim == 2 or a.shape[2] == 1:
        return _as_rgb_view(a.reshape(a.shape[:2]))
    return a


def _as_rgb_view(gray: np.ndarray) -> np.ndarray:
    return np.broadcast_to(gray[:, :, None], gray.shape + (3,))  # (H, W, 3), channel stride 0


def _check_size(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise InputError(
            f"{name}: {w}x{h} = {w * h:,} pixels is over the {MAX_PIXELS:,}-pixel limit "
            "(decompression-bomb guard) — downscale it first"
        )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]

"""pydicom at arm's length: read a file, pull the tags we use, decode one frame.

Everything that touches pydicom on untrusted input lives here, so that every failure becomes one
`InputError` line naming the file and, at most, a tag *keyword* — never a tag value, never
`str(dataset)`. pydicom's own warnings and log records can quote values (an invalid birth date,
a too-long name), so they are silenced while we read (`quiet_pydicom`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from runtime.errors import InputError

GRAY = ("MONOCHROME1", "MONOCHROME2")
# pydicom hands YBR_* back as RGB (JPEG and J2K decoders undo their own colour transforms).
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
PALETTE = "PALETTE COLOR"
_KNOWN_PHOTOMETRIC = GRAY + COLOR + (PALETTE, "YBR_PARTIAL_422", "YBR_PARTIAL_420", "HSV",
                                     "ARGB", "CMYK", "XYB")

# Objects that carry pixels but are not pictures MedGemma reads: dose grids and label masks.
NOT_PICTURES = {"RTDOSE": "an RT dose grid", "SEG": "a segmentation mask"}

_MAX_FRAME_BYTES = 1 << 30  # a 1 GiB frame is no radiograph; such a header is damaged
_REDO = "copy it again from the PACS or re-export it"


@dataclass
class Source:
    name: str  # how messages refer to it: the path as given, or "DICOM bytes"
    path: Path | None = None
    data: bytes | None = None
    explicit: bool = True  # named by the user; False: found in a directory (skip if not DICOM)


# ---------------------------------------------------------------------------------------------
# Silence

_quiet_lock = threading.Lock()
_quiet_depth = 0  # nested/concurrent readers: the outermost one restores the loggers
_quiet_saved: dict[logging.Logger, bool] = {}
# pydicom and its decoder plugins log through child loggers too ("pydicom.pixels.decoders.base");
# a child's records reach the root handlers even when the parent is disabled, so each is.
_QUIET_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "_openjpeg", "libjpeg", "rle")


def _library_loggers() -> list[logging.Logger]:
    names = {n for n in logging.root.manager.loggerDict if n.split(".")[0] in _QUIET_LOGGERS}
    return [logging.getLogger(n) for n in sorted(names | {"pydicom"})]


@contextlib.contextmanager
def quiet_pydicom():
    """No pydicom warning or log record escapes while reading: they may quote patient values."""
    global _quiet_depth
    with _quiet_lock:
        if _quiet_depth == 0:
            for logger in _library_loggers():
                _quiet_saved[logger] = logger.disabled
                logger.disabled = True
        _quiet_depth += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for logger, was in _quiet_saved.items():
                    logger.disabled = was
                _quiet_saved.clear()


# ---------------------------------------------------------------------------------------------
# Reading

def read(source: Source, *, header_only: bool = False):
    """Dataset of `source`, or None for a non-DICOM file found in a directory."""
    fh = io.BytesIO(source.data) if source.data is not None else source.path
    try:
        return _with_transfer_syntax(pydicom.dcmread(fh, stop_before_pixels=header_only))
    except pydicom.errors.InvalidDicomError:
        if not source.explicit:
            return None
    except OSError as err:
        raise InputError(f"{source.name}: cannot open it ({err.strerror or type(err).__name__})"
                         f" — check the path and its permissions") from None
    except Exception as err:  # pydicom raises whatever its parser hit on damaged bytes
        raise InputError(_damaged(source, err)) from None
    # No 'DICM' marker: old exports omit the preamble and file meta; try the bare dataset.
    if source.data is not None:
        fh = io.BytesIO(source.data)
    try:
        ds = pydicom.dcmread(fh, force=True, stop_before_pixels=header_only)
    except Exception as err:
        raise InputError(_damaged(source, err)) from None
    if "SOPClassUID" not in ds and "Rows" not in ds:
        raise InputError(f"{source.name}: not a DICOM file — pass a DICOM file (.dcm), a "
                         f"directory holding one series, or a list of its files")
    return _with_transfer_syntax(ds)


def _with_transfer_syntax(ds):
    # A dataset without file meta still knows how it was encoded; the decoders need the UID.
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return ds
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return ds
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit
                              else pydicom.uid.ExplicitVRLittleEndian if little
                              else pydicom.uid.ExplicitVRBigEndian)
    return ds


def _damaged(source: Source, err: Exception) -> str:
    return (f"{source.name}: cannot read this DICOM file, it is damaged or truncated "
            f"(pydicom: {type(err).__name__}) — {_REDO}")


# ---------------------------------------------------------------------------------------------
# Tags

def tag(ds, keyword: str, source: Source, convert=None, default=None, *, strict=True):
    """Value of `keyword` through `convert`; a value that will not parse is an InputError when
    `strict`, else `default` (for tags that only order slices or set a window)."""
    try:
        value = ds.get(keyword)
        if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
            return default
        return convert(value) if convert else value
    except Exception:
        if not strict:
            return default
        raise InputError(f"{source.name}: tag {keyword} holds a value that cannot be read — "
                         f"fix or remove it (e.g. with dcmodify) or {_REDO}") from None


def first(value):
    """First of a multi-valued element (WindowCenter often holds several)."""
    return value[0] if isinstance(value, (list, tuple, MultiValue)) else value


def finite_float(value) -> float:
    out = float(first(value))
    if not math.isfinite(out):
        raise ValueError("not finite")
    return out


def floats(count: int):
    def convert(value) -> tuple[float, ...]:
        out = tuple(float(v) for v in value)
        if len(out) != count or not all(math.isfinite(v) for v in out):
            raise ValueError("wrong count")
        return out
    return convert


def code(value, known, fallback: str) -> str:
    """A coded value fit to print: only codes from `known` are shown, anything else could be
    free text a damaged or crafted file put there."""
    text = str(value).strip().upper()
    return text if text in known else fallback


@dataclass
class PixelLayout:
    rows: int
    columns: int
    frames: int
    samples: int
    photometric: str
    bits_allocated: int
    bits_stored: int


def layout(ds, source: Source) -> PixelLayout:
    """The Image Pixel tags, checked; raises for pictures we cannot or should not decode."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(no_image_message(ds, source))
    rows = tag(ds, "Rows", source, int)
    columns = tag(ds, "Columns", source, int)
    if not rows or not columns or rows < 0 or columns < 0:
        raise InputError(f"{source.name}: Rows/Columns are missing or zero, the image header "
                         f"is damaged — {_REDO}")
    samples = tag(ds, "SamplesPerPixel", source, int, 1)
    frames = tag(ds, "NumberOfFrames", source, int, 1) or 1
    bits_allocated = tag(ds, "BitsAllocated", source, int, 0)
    bits_stored = tag(ds, "BitsStored", source, int, bits_allocated)
    raw_pi = tag(ds, "PhotometricInterpretation", source, str, "")
    photometric = code(raw_pi, _KNOWN_PHOTOMETRIC, "")
    if frames < 1 or bits_allocated not in (1, 8, 16, 32, 64):
        raise InputError(f"{source.name}: NumberOfFrames or BitsAllocated is out of range, the "
                         f"image header is damaged — {_REDO}")
    if photometric not in GRAY + COLOR + (PALETTE,):
        shown = photometric or "an unknown one"
        raise InputError(f"{source.name}: photometric interpretation {shown} is not supported — "
                         f"convert the image to MONOCHROME2 or RGB (e.g. gdcmconv or dcmconv)")
    if samples != (3 if photometric in COLOR else 1):
        raise InputError(f"{source.name}: SamplesPerPixel disagrees with the photometric "
                         f"interpretation {photometric}, the header is damaged — {_REDO}")
    if rows * columns * samples * max(bits_allocated // 8, 1) > _MAX_FRAME_BYTES:
        raise InputError(f"{source.name}: Rows × Columns in the header is implausibly large, "
                         f"the header is damaged — {_REDO}")
    return PixelLayout(rows, columns, frames, samples, photometric, bits_allocated, bits_stored)


def no_image_message(ds, source: Source) -> str:
    kind = "no pixel data"
    try:
        sop = UID(str(ds.get("SOPClassUID", "")))
        if sop.is_valid and sop.name != str(sop):  # a registered class name, never file text
            kind = f"{sop.name} object, no pixel data"
    except Exception:
        pass
    return (f"{source.name}: holds no image ({kind}) — pass a DICOM image such as CT, MR, CR "
            f"or DX")


# ---------------------------------------------------------------------------------------------
# Pixels

def decode(ds, frame: int, pixels: PixelLayout, source: Source) -> np.ndarray:
    """One frame, native byte order: (rows, cols) gray or (rows, cols, 3) colour (YBR → RGB)."""
    index = frame if pixels.frames > 1 else None
    try:
        arr = pixel_array(ds, index=index)
    except BaseException as err:  # pylibjpeg-rle (Rust) panics on bad data: a BaseException
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise InputError(_decode_failure(ds, source, err)) from None
    want = (pixels.rows, pixels.columns) + ((3,) if pixels.samples == 3 else ())
    if arr.shape != want:
        raise InputError(f"{source.name}: the decoded image does not match Rows/Columns in the "
                         f"header, the file is damaged — {_REDO}")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def _decode_failure(ds, source: Source, err: Exception) -> str:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts = UID(str(ts)) if ts else None
    if ts is None or not ts.is_transfer_syntax:
        return (f"{source.name}: the transfer syntax is missing or unknown, so the pixel data "
                f"cannot be decoded — re-export the file with a standard transfer syntax")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return (f"{source.name}: pixel data is encoded as {ts.name}, which no installed decoder "
                f"reads — re-export it uncompressed (e.g. gdcmconv --raw)")
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        return (f"{source.name}: pixel data is compressed as {ts.name} and no decoder for it is "
                f"installed — install one of: {needs}")
    if not ts.is_compressed:
        try:
            short = len(ds.PixelData) < get_expected_length(ds)
        except Exception:
            short = False
        if short:
            return (f"{source.name}: the file is truncated (its pixel data is shorter than the "
                    f"header says) — {_REDO}")
    return (f"{source.name}: cannot decode the pixel data ({ts.name}, pydicom: "
            f"{type(err).__name__}); it is damaged or uses a variant the installed decoders do "
            f"not handle — copy it again from the PACS, or re-export it uncompressed "
            f"(e.g. gdcmconv --raw)")

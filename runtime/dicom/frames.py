"""One frame's pixels: the Image Pixel tags checked and bounded, then decoded by pydicom.

Sizes are bounded from the header before anything is decoded (`check_frame`, with the picture
limit of runtime/images.py), and a compressed frame must declare the size the header does
(`_check_codestream`), because its decoder allocates by the codestream, not by Rows/Columns.
"""

from __future__ import annotations

from dataclasses import dataclass

from medgemma_edge.runtime.dicom import offline  # noqa: F401 — before pydicom (see offline.py)

import numpy as np
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes,
                         JPEGTransferSyntaxes)

from medgemma_edge.runtime.dicom.raw import codestream_size
from medgemma_edge.runtime.dicom.read import REDO, Source, code, tag
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.images import MAX_PIXELS

GRAY = ("MONOCHROME1", "MONOCHROME2")
# pydicom hands YBR_* back as RGB (JPEG and J2K decoders undo their own colour transforms).
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
PALETTE = "PALETTE COLOR"
_KNOWN_PHOTOMETRIC = GRAY + COLOR + (PALETTE, "YBR_PARTIAL_422", "YBR_PARTIAL_420", "HSV",
                                     "ARGB", "CMYK", "XYB")

_MAX_FRAME_BYTES = 1 << 30  # a 1 GiB frame is no radiograph; such a header is damaged
_CODESTREAMS = (set(JPEGTransferSyntaxes) | set(JPEGLSTransferSyntaxes)
                | set(JPEG2000TransferSyntaxes))


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
                         f"is damaged — {REDO}")
    samples = tag(ds, "SamplesPerPixel", source, int, 1)
    frames = tag(ds, "NumberOfFrames", source, int, 1) or 1
    bits_allocated = tag(ds, "BitsAllocated", source, int, 0)
    bits_stored = tag(ds, "BitsStored", source, int, bits_allocated)
    raw_pi = tag(ds, "PhotometricInterpretation", source, str, "")
    photometric = code(raw_pi, _KNOWN_PHOTOMETRIC, "")
    if frames < 1 or bits_allocated not in (1, 8, 16, 32, 64):
        raise InputError(f"{source.name}: NumberOfFrames or BitsAllocated is out of range, the "
                         f"image header is damaged — {REDO}")
    if photometric not in GRAY + COLOR + (PALETTE,):
        shown = photometric or "an unknown one"
        raise InputError(f"{source.name}: photometric interpretation {shown} is not supported — "
                         f"convert the image to MONOCHROME2 or RGB (e.g. gdcmconv or dcmconv)")
    if samples != (3 if photometric in COLOR else 1):
        raise InputError(f"{source.name}: SamplesPerPixel disagrees with the photometric "
                         f"interpretation {photometric}, the header is damaged — {REDO}")
    check_frame(rows, columns, source, samples * max(bits_allocated // 8, 1))
    return PixelLayout(rows, columns, frames, samples, photometric, bits_allocated, bits_stored)


def check_frame(rows: int, columns: int, source: Source, bytes_per_pixel: int = 1) -> None:
    """One frame's size from the header, bounded before anything is decoded: the picture limit
    (runtime/images.py MAX_PIXELS), and bytes for what pixel data may hold."""
    if rows * columns > MAX_PIXELS:
        raise InputError(f"{source.name}: a {columns}×{rows} frame is {rows * columns:,} pixels, "
                         f"over the {MAX_PIXELS:,}-pixel limit (decompression-bomb guard) — "
                         f"downscale it or export a smaller image")
    if rows * columns * bytes_per_pixel > _MAX_FRAME_BYTES:
        raise InputError(f"{source.name}: Rows × Columns in the header is implausibly large, "
                         f"the header is damaged — {REDO}")


def no_image_message(ds, source: Source) -> str:
    kind, image_class = "no pixel data", False
    try:
        meta = getattr(ds, "file_meta", None) or {}
        sop = UID(str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "")))
        if sop.is_valid and sop.name != str(sop):  # a registered class name, never file text
            kind = f"{sop.name} object, no pixel data"
            image_class = "Image Storage" in sop.name
    except Exception:
        pass
    if image_class:  # an image object whose pixels are missing: cut short before them
        return (f"{source.name}: the file ends before its pixel data ({kind}): it is truncated "
                f"or its pixels were removed — {REDO}")
    return (f"{source.name}: holds no image ({kind}) — pass a DICOM image such as CT, MR, CR "
            f"or DX")


# ---------------------------------------------------------------------------------------------
# Pixels

def decode(ds, frame: int, pixels: PixelLayout, source: Source) -> np.ndarray:
    """One frame, native byte order: (rows, cols) gray or (rows, cols, 3) colour (YBR → RGB)."""
    index = frame if pixels.frames > 1 else None
    _check_codestream(ds, frame, pixels, source)
    try:
        arr = pixel_array(ds, index=index)
    except MemoryError:
        raise
    except BaseException as err:  # pylibjpeg-rle (Rust) panics on bad data: a BaseException
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise InputError(_decode_failure(ds, source, err)) from None
    want = (pixels.rows, pixels.columns) + ((3,) if pixels.samples == 3 else ())
    if arr.shape != want:
        raise InputError(f"{source.name}: the decoded image does not match Rows/Columns in the "
                         f"header, the file is damaged — {REDO}")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def _check_codestream(ds, frame: int, pixels: PixelLayout, source: Source) -> None:
    """A JPEG, JPEG-LS or JPEG 2000 decoder sizes its output by the codestream's own header, not
    by Rows/Columns: a 64×64 file whose codestream claims 60000×60000 had libjpeg allocate GBs.
    So the frame must declare exactly the size the (already bounded) header does."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or UID(str(ts)) not in _CODESTREAMS:
        return
    try:
        extended = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        encoded = get_frame(ds.PixelData, frame, number_of_frames=pixels.frames,
                            extended_offsets=extended)
    except MemoryError:
        raise
    except Exception as err:
        raise InputError(_decode_failure(ds, source, err)) from None
    declared = codestream_size(encoded)
    if declared != (pixels.rows, pixels.columns, pixels.samples):
        said = (f"declares {declared[1]}×{declared[0]} with {declared[2]} components" if declared
                else "has no readable frame header")
        raise InputError(f"{source.name}: the compressed frame {said}, the header "
                         f"{pixels.columns}×{pixels.rows} with {pixels.samples}; the file is "
                         f"damaged — {REDO}")


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
                    f"header says) — {REDO}")
    return (f"{source.name}: cannot decode the pixel data ({ts.name}, pydicom: "
            f"{type(err).__name__}); it is damaged or uses a variant the installed decoders do "
            f"not handle — copy it again from the PACS, or re-export it uncompressed "
            f"(e.g. gdcmconv --raw)")

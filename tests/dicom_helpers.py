"""Shared by the DICOM tests: exact/tolerant comparisons that say how far off, and small DICOM
files written from scratch (so a test controls every tag)."""

from __future__ import annotations

import contextlib
import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, MRImageStorage, RLELossless,
                         SecondaryCaptureImageStorage, generate_uid)

# Values a test can look for in messages, logs and warnings: none may ever appear there.
PATIENT_MARKERS = {
    "PatientName": "Quokka^Zebedee",
    "PatientID": "QZX-998877",
    "PatientBirthDate": "19330211",
    "AccessionNumber": "ACC-5551234",
    "OtherPatientIDs": "OPID-24681357",
    "InstitutionName": "Marmot General Hospital",
    "ReferringPhysicianName": "Dr^Wombat",
}


def shipped(name: str) -> str:
    return get_testdata_file(name)


def differences(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return np.abs(got.astype(np.int64) - want.astype(np.int64))


def assert_same(got: np.ndarray, want: np.ndarray, what: str):
    diff = differences(got, want)
    if diff.any():
        where = tuple(int(i) for i in np.unravel_index(diff.argmax(), diff.shape))
        pytest.fail(f"{what}: {int((diff > 0).sum())} of {diff.size} values differ, worst "
                    f"{int(diff.max())} at {where} (got {got[where]}, want {want[where]})")


def assert_close(got: np.ndarray, want: np.ndarray, what: str, *, max_abs: float | None = None,
                 min_psnr: float | None = None):
    diff = differences(got, want).astype(np.float64)
    mse = float((diff ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
    report = (f"{what}: worst {diff.max():g}, mean {diff.mean():.3f}, PSNR {psnr:.2f} dB "
              f"(allowed: max {max_abs}, PSNR ≥ {min_psnr})")
    if max_abs is not None:
        assert diff.max() <= max_abs, report
    if min_psnr is not None:
        assert psnr >= min_psnr, report


def with_patient(ds: Dataset) -> Dataset:
    for keyword, value in PATIENT_MARKERS.items():
        setattr(ds, keyword, value)
    return ds


def image_dataset(pixels: np.ndarray, *, modality: str = "CT", series_uid: str | None = None,
                  instance: int | None = None, position=None,
                  orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), slope: float | None = 1.0,
                  intercept: float | None = -1024.0, frames: int | None = None,
                  photometric: str = "MONOCHROME2") -> Dataset:
    """A minimal uncompressed gray image; pixels (H, W) or (frames, H, W), int16 or uint16."""
    sop = MRImageStorage if modality == "MR" else CTImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid or "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesNumber = 7
    with_patient(ds)
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    # Encoding given explicitly, so a test may put a bogus Transfer Syntax UID in the meta.
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def rewrite(name: str, path: Path, pixels: np.ndarray | None = None, **tags) -> Path:
    """A shipped test file with tags changed (None deletes) and, optionally, new pixels."""
    ds = pydicom.dcmread(shipped(name))
    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if pixels is not None:
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(path)
    return path


# ---------------------------------------------------------------------------------------------
# Series: slice k can be recognised from its pixels

SIDE = 6


def slice_pixels(k: int) -> np.ndarray:
    # Slice k is 8·k + a ramp: every slice windows to a different picture in the R channel.
    return (8 * k + np.arange(SIDE * SIDE).reshape(SIDE, SIDE)).astype(np.int16)


def write_series(folder, n, *, numbers=True, positions=False, normal_tilt=False, shuffle=True,
                 series_uid=None, modality="CT", first_number=1001):
    folder.mkdir(parents=True, exist_ok=True)
    orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    if normal_tilt:  # an oblique stack: rows along x, columns tilted in y-z
        c = np.cos(0.4)
        orientation = (1.0, 0.0, 0.0, 0.0, c, np.sin(0.4))
    normal = np.cross(orientation[:3], orientation[3:])
    order = list(range(n))
    if shuffle:
        random.Random(n).shuffle(order)
    paths = []
    for write_index, k in enumerate(order):
        ds = image_dataset(slice_pixels(k), modality=modality, series_uid=series_uid,
                           instance=first_number + k if numbers else None,
                           position=tuple(-50.0 + 2.5 * k * normal) if positions else None,
                           orientation=orientation)
        # File names in write order, not slice order, so directory order proves nothing.
        paths.append(save(ds, folder / f"IM{write_index:04d}_{random.Random(k).randint(0, 9999)}"))
    return paths


# ---------------------------------------------------------------------------------------------
# PALETTE COLOR: tables of known values in any stored width and byte order

def palette_tables(bits: int, entries: int = 256) -> np.ndarray:
    """(3, entries): red ramps up, green down, blue a zigzag, in the top 8 of `bits`; the bits
    below hold another pattern, so a byte-swapped 16-bit table shows."""
    v = np.arange(entries)
    colours = np.stack([v, 255 - v, v * 37 % 256]) % 256
    low = (v * 7 + 3) % (1 << (bits - 8))
    return (colours << (bits - 8)) | low


def palette_dataset(pixels: np.ndarray, tables: np.ndarray, *, little: bool = True,
                    bits: int = 16, width: int = 2, vr: str = "OW", first_map: int = 0) -> Dataset:
    """An 8-bit PALETTE COLOR image whose tables are stored `width` bytes per entry (in the
    dataset's byte order) under a descriptor that declares `bits`."""
    ds = _header(*pixels.shape, transfer_syntax=ExplicitVRLittleEndian if little
                 else ExplicitVRBigEndian)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    for colour, values in zip(("Red", "Green", "Blue"), tables):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(values), first_map, bits])
        if vr == "US":
            ds.add_new(f"{colour}PaletteColorLookupTableData", "US", [int(x) for x in values])
        else:
            data = values.astype(f"{'<' if little else '>'}u{width}").tobytes()
            ds.add_new(f"{colour}PaletteColorLookupTableData", vr, data)
    return ds


# ---------------------------------------------------------------------------------------------
# Hostile files, built by the tests (never committed): small on disk, huge once decoded

def _header(rows: int, columns: int, *, bits: int = 8, frames: int | None = None,
            transfer_syntax=ExplicitVRLittleEndian) -> Dataset:
    """A gray secondary-capture header with no pixel data yet (patient markers included)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    # A fixed UID: the same bytes in every run, so a derandomized fuzz of them reproduces.
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4"
    meta.TransferSyntaxUID = transfer_syntax
    ds = with_patient(Dataset())
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.Rows, ds.Columns = rows, columns
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    return ds


def rle_frame(rows: int, columns: int) -> bytes:
    """One 8-bit frame of zeros in RLE Lossless (PS3.5 Annex G): a 64-byte header naming one
    segment, then replicate runs of 128 (2 bytes each), every row encoded on its own."""
    runs = []
    left = columns
    while left:
        n = min(left, 128)
        runs.append(bytes([257 - n if n > 1 else 0, 0]))  # n == 1: a literal run of one byte
        left -= n
    segment = b"".join(runs) * rows
    segment += b"\0" * (len(segment) % 2)
    return struct.pack("<16I", 1, 64, *[0] * 14) + segment


def rle_dicom(rows: int, columns: int, frames: int = 1, *, encoded=None) -> bytes:
    """A real RLE file of zero frames: about rows × columns / 64 bytes per frame; or, with
    `encoded=(r, c)`, frames of r × c under a header that claims rows × columns."""
    ds = _header(rows, columns, frames=frames if frames > 1 else None,
                 transfer_syntax=RLELossless)
    ds.PixelData = encapsulate([rle_frame(*(encoded or (rows, columns)))] * frames)
    ds["PixelData"].VR = "OB"
    return _as_bytes(ds)


def deflated_dicom(rows: int, columns: int, *, bits: int = 8, pixel_bytes: int | None = None
                   ) -> bytes:
    """A real deflated file whose pixel data is zeros: rows × columns × bits/8 bytes inflate
    from ~1/1000 of that (or `pixel_bytes`, for a header that claims more than it holds)."""
    ds = _header(rows, columns, bits=bits, transfer_syntax=DeflatedExplicitVRLittleEndian)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    size = rows * columns * bits // 8 if pixel_bytes is None else pixel_bytes
    size += size % 2
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(body.getvalue()),
             deflater.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size))]
    chunk = bytes(16 << 20)
    while size:
        parts.append(deflater.compress(chunk[:min(size, len(chunk))]))
        size -= min(size, len(chunk))
    parts.append(deflater.flush())
    return b"\0" * 128 + b"DICM" + meta.getvalue() + b"".join(parts)


def codestream_liar(name: str, rows: int = 60000, columns: int = 60000) -> bytes:
    """A shipped JPEG, JPEG-LS or JPEG 2000 file whose codestream now declares rows × columns
    while Rows/Columns still say the small truth: decoders allocate by the codestream."""
    data = bytearray(Path(shipped(name)).read_bytes())
    start = data.rindex(b"\xe0\x7f\x10\x00")  # the pixel data element
    # (marker, offset of the size after it, layout): J2K SIZ (Xsiz, Ysiz), JPEG baseline,
    # JPEG extended and JPEG-LS frame headers (lines, samples per line)
    for marker, at, fmt, values in ((b"\xff\x51", 6, ">II", (columns, rows)),
                                    (b"\xff\xc0", 5, ">HH", (rows, columns)),
                                    (b"\xff\xc1", 5, ">HH", (rows, columns)),
                                    (b"\xff\xf7", 5, ">HH", (rows, columns))):
        found = data.find(marker, start)
        if found != -1:
            struct.pack_into(fmt, data, found + at, *values)
            return bytes(data)
    raise ValueError(f"{name}: no frame header found")


def bare(name: str, *, implicit: bool = True) -> bytes:
    """A shipped file as old exports write it: no preamble, no 'DICM', no file meta."""
    ds = pydicom.dcmread(shipped(name))
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return out.getvalue()


@contextlib.contextmanager
def memory_headroom(extra: int = 3 << 30):
    """This process may map at most `extra` more bytes inside the block (soft RLIMIT_AS, put
    back after): a bomb that slips through ends in MemoryError, not in a swapping machine."""
    try:
        import resource

        with open("/proc/self/statm") as fh:
            mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + extra
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            limit = min(limit, bound)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _as_bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return out.getvalue()

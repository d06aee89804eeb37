"""Shared by the DICOM tests: exact/tolerant comparisons that say how far off, and small DICOM
files written from scratch (so a test controls every tag)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

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

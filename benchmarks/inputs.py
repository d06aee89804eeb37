"""Test inputs for the benchmark, written once per run into a folder: what a clinic hands us.

    xray.png        2500 x 2048 8-bit gray chest-film-like PNG (synthetic_xray)
    xray16.dcm      the same film as a 16-bit DX DICOM (12 bits stored, with a VOI window)
    ct/             a CT series of 512 x 512 int16 slices in Hounsfield units, built from
                    pydicom's CT_small.dcm (upsampled, each slice shifted a little)
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


@dataclass(frozen=True)
class Inputs:
    png: Path
    dicom16: Path
    ct_dir: Path
    ct_slices: int

    def items(self) -> list[tuple[str, Path]]:
        """(kind, path) of every input, in report order."""
        return [("png", self.png), ("dicom16", self.dicom16), ("ct_series", self.ct_dir)]


LABELS = {"png": "PNG X-ray 2500x2048 8-bit", "dicom16": "DICOM DX 2500x2048 16-bit",
          "ct_series": "CT series 512x512 int16"}
WIDTH, HEIGHT = 2500, 2048  # a chest film's pixels at ~0.17 mm


def synthetic_xray(bits: int, seed: int = 0) -> np.ndarray:
    """(H, W) gray: soft body, rib-like bands, lungs, detector noise. Compresses like a real film
    (a noise-free picture would decode unrealistically fast and flatter the floor)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(-1, 1, HEIGHT, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, WIDTH, dtype=np.float32)[None, :]
    body = np.exp(-(x / 0.8) ** 2 - (y / 0.95) ** 4)
    lungs = np.exp(-((np.abs(x) - 0.4) / 0.22) ** 2 - (y / 0.6) ** 2)
    ribs = 0.5 + 0.5 * np.sin(y * 40 + 3 * x ** 2)
    density = 0.15 + 0.75 * body - 0.35 * lungs + 0.08 * ribs * body  # (H, W), 0..1
    top = (1 << bits) - 1
    noise = rng.normal(0, 0.01, density.shape).astype(np.float32)
    return np.clip((density + noise) * top, 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def _file_meta(sop_class: str, sop_uid: str):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def write_dx(path: Path, pixels: np.ndarray) -> None:
    """A minimal DX file: 16-bit allocated, 12 stored, MONOCHROME2, with a window."""
    from pydicom.dataset import FileDataset
    from pydicom.uid import generate_uid

    uid = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=_file_meta(DX_STORAGE, uid), preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 3600
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def write_ct_series(folder: Path, n: int, size: int = 512) -> None:
    """n CT slices from pydicom's CT_small.dcm, upsampled to size x size, InstanceNumber 1..n
    written in shuffled file order (so the loader has to sort)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    stored = base.pixel_array
    raw = stored.astype(np.int32)  # (128, 128) stored values
    rep = size // raw.shape[0]
    big = np.kron(raw, np.ones((rep, rep), np.int32))  # (size, size)
    series = generate_uid()
    order = np.random.default_rng(0).permutation(n)
    for k, i in enumerate(order):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = int(i) + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 2.5]
        ds.SliceLocation = float(i) * 2.5
        ds.Rows = ds.Columns = size
        shifted = np.roll(big, int(i) * 3, axis=0) + int(i)  # each slice a little different
        ds.PixelData = shifted.astype(stored.dtype).tobytes()
        ds.save_as(str(folder / f"slice_{k:03d}.dcm"))


def write_inputs(folder: Path, ct_slices: int) -> Inputs:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(folder / "xray.png", folder / "xray16.dcm", folder / "ct", ct_slices)
    if not inputs.png.is_file():
        Image.fromarray(synthetic_xray(8)).save(inputs.png)
    if not inputs.dicom16.is_file():
        write_dx(inputs.dicom16, synthetic_xray(12))
    if not inputs.ct_dir.is_dir() or len(list(inputs.ct_dir.glob("*.dcm"))) != ct_slices:
        shutil.rmtree(inputs.ct_dir, ignore_errors=True)  # one series per folder
        write_ct_series(inputs.ct_dir, ct_slices)
    return inputs

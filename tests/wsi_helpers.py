"""Whole-slide images for the tests, built here: pyramidal tiled TIFFs that OpenSlide reads as
Aperio (an "Aperio Image Library" description: AppMag gives objective power, MPP microns per
pixel) or as generic TIFF, and DICOM WSI series (VL Whole Slide Microscopy, TILED_FULL,
uncompressed, one instance per level).

A level can be an array (written as is) or a (width, height, rgb) constant, written as the same
pre-compressed tile over and over: a 100,000-pixel level costs a few kB of work, not 30 GB.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import tifffile

TILE = 256
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
TISSUE_PINK = (190, 80, 140)  # grey ~121: tissue
PALE = (222, 214, 214)  # grey ~216: above 204, glass with a tint
BLACK = (0, 0, 0)  # grey 0: below 1, no scan


def aperio_description(width: int, height: int, app_mag=None, mpp=None) -> str:
    fields = [f"{width}x{height}"] + ([f"AppMag = {app_mag}"] if app_mag else []) + ([f"MPP = {mpp}"] if mpp else [])
    return "Aperio Image Library v12.0.0\n" + " |".join(fields)


def _constant_tiles(width: int, height: int, rgb, tile: int):
    encoded = zlib.compress(np.full((tile, tile, 3), rgb, np.uint8).tobytes())
    for _ in range(-(-width // tile) * -(-height // tile)):
        yield encoded


def write_tiff_slide(path: Path, levels: list, description: str | None, tile: int = TILE,
                     tile_for=None) -> Path:
    """levels: arrays (H, W, 3) uint8, or (width, height, rgb) constants; tile_for: optional
    function (width, height) -> iterator of encoded tiles, for patterned huge levels."""
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, level in enumerate(levels):
            kw = dict(tile=(tile, tile), photometric="rgb", compression="zlib", metadata=None,
                      description=description if i == 0 else None, subfiletype=0 if i == 0 else 1)
            if isinstance(level, np.ndarray):
                tw.write(level, **kw)
            else:
                width, height, rgb = level
                tiles = tile_for(width, height) if tile_for else _constant_tiles(width, height, rgb, tile)
                tw.write(tiles, shape=(height, width, 3), dtype=np.uint8, **kw)
    return path


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[:h * factor, :w * factor].reshape(h, factor, w, factor, 3).astype(np.float64)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def patch_level_image(width: int, height: int, seed: int = 1) -> np.ndarray:
    """White glass with textured tissue at known places, a pale smear and a black corner."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 255, np.uint8)
    noise = rng.integers(-25, 26, size=(height, width, 1))
    pink = np.clip(np.array(TISSUE_PINK) + noise, 0, 255).astype(np.uint8)
    for x0, y0, x1, y1 in [(300, 200, 2300, 1900), (2900, 1000, 4100, 2100), (1000, 2700, 5300, 3500)]:
        image[y0:y1, x0:x1] = pink[y0:y1, x0:x1]
    image[1792:2688, 4480:5376] = PALE  # patch (2, 5) of a 896 grid: pale, not tissue
    image[:896, 4480:5376] = BLACK  # patch (0, 5): black, not tissue
    return image


def write_dicom_wsi(folder: Path, levels: list[np.ndarray], mpp: float, tile: int = TILE) -> list[Path]:
    """One VL Whole Slide Microscopy instance per level (level i a power-of-two downsample of level
    0 as given), TILED_FULL, explicit VR little endian, uncompressed RGB."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    width0 = levels[0].shape[1]
    for i, level in enumerate(levels):
        h, w = level.shape[:2]
        down = width0 / w
        ty, tx = -(-h // tile), -(-w // tile)
        padded = np.full((ty * tile, tx * tile, 3), 255, np.uint8)
        padded[:h, :w] = level
        tiles = padded.reshape(ty, tile, tx, tile, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile, tile, 3)
        meta = FileMetaDataset()
        uid = generate_uid()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = WSI_SOP_CLASS, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = WSI_SOP_CLASS, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "SM"
        ds.ImageType = ["ORIGINAL" if i == 0 else "DERIVED", "PRIMARY", "VOLUME", "NONE"]
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.Rows = ds.Columns = tile
        ds.NumberOfFrames = len(tiles)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * mpp * down / 1000, h * mpp * down / 1000
        measures = Dataset()
        measures.PixelSpacing = [mpp * down / 1000, mpp * down / 1000]  # mm
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
        ds.PixelData = tiles.tobytes()
        paths.append(folder / f"level{i}.dcm")
        pydicom.dcmwrite(paths[-1], ds, enforce_file_format=True)
    return paths

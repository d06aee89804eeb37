"""A DICOM WSI written by a WSI library, wsidicom (issue #24), independent of
tests/wsi_helpers.py::write_dicom_wsi, which sets the attributes itself with pydicom.

wsidicom's own writer (`WsiDicom.save`) is given the levels through its documented extension
points: an `ImageData` that serves tiles from a numpy array, and a `Source` of one `WsiInstance`
per level, whose datasets wsidicom builds from its `WsiMetadata` model (patient, study, series,
slide and specimen, optical path with an sRGB ICC profile, pixel spacing, image type per level).
It writes VL Whole Slide Microscopy instances, TILED_FULL, one per level, explicit VR little
endian RGB or, transcoded by wsidicom, JPEG 2000 lossless (YBR_RCT): both exact.

Kept apart from wsi_helpers.py: importing wsidicom costs a second or two, paid by its test only.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from wsidicom import WsiDicom, WsiInstance
from wsidicom.codec import Encoder
from wsidicom.codec.settings import Channels, Jpeg2kSettings
from wsidicom.geometry import Point, Size, SizeMm
from wsidicom.instance import ImageData
from wsidicom.metadata import (Equipment, Image, ImageType, Label, Patient, Pyramid, Series, Slide, SlideSample,
                               Study, WsiMetadata)
from wsidicom.metadata.schema.dicom import WsiMetadataDicomSchema
from wsidicom.source import Source

from tests.wsi_helpers import TILE


class ArrayImageData(ImageData):
    """One level held as an (H, W, 3) uint8 array, served as uncompressed RGB tiles (edge tiles
    padded with white, as a scanner pads them)."""

    def __init__(self, array: np.ndarray, tile: int, spacing_mm: float):
        self._array, self._tile, self._spacing = array, tile, spacing_mm
        super().__init__(Encoder.create(ExplicitVRLittleEndian, 8, "RGB"))

    transfer_syntax = property(lambda self: ExplicitVRLittleEndian)
    image_size = property(lambda self: Size(self._array.shape[1], self._array.shape[0]))
    tile_size = property(lambda self: Size(self._tile, self._tile))
    pixel_spacing = property(lambda self: SizeMm(self._spacing, self._spacing))
    imaged_size = property(lambda self: None)  # image size × pixel spacing
    samples_per_pixel = property(lambda self: 3)
    photometric_interpretation = property(lambda self: "RGB")
    bits = property(lambda self: 8)
    image_coordinate_system = property(lambda self: None)  # wsidicom's default origin
    thread_safe = property(lambda self: True)
    lossy_compression = property(lambda self: None)  # never lossy compressed
    transcoder = property(lambda self: None)

    def get_decoded_tile(self, tile_point: Point, z: float, path: str, cache: bool = True) -> np.ndarray:
        t = self._tile
        tile = np.full((t, t, 3), 255, np.uint8)
        part = self._array[tile_point.y * t:(tile_point.y + 1) * t, tile_point.x * t:(tile_point.x + 1) * t]
        tile[:part.shape[0], :part.shape[1]] = part
        return tile

    def get_encoded_tile(self, tile: Point, z: float, path: str) -> bytes:
        return self.encoder.encode(self.get_decoded_tile(tile, z, path))


class ArraySource(Source):
    """The levels as the volume instances of one pyramid; no label, overview or thumbnail."""

    def __init__(self, levels: list[np.ndarray], mpp: float, tile: int):
        super().__init__()
        metadata = WsiMetadata(
            study=Study(uid=generate_uid()), series=Series(uid=generate_uid()), patient=Patient(),
            equipment=Equipment(),
            slide=Slide(identifier="slide-1", samples=[SlideSample(identifier="sample-1", uid=generate_uid())]),
            pyramid=Pyramid(image=Image(), optical_paths=[], uid=generate_uid()), label=Label(),
            frame_of_reference_uid=generate_uid(), dimension_organization_uids=[generate_uid()])
        base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME, require_icc_profile=True)
        width0 = levels[0].shape[1]
        self._levels = [  # create_instance completes the dataset it is given: one copy per level
            WsiInstance.create_instance(ArrayImageData(level, tile, mpp * width0 / level.shape[1] / 1000),
                                        copy.deepcopy(base), ImageType.VOLUME, i)
            for i, level in enumerate(levels)]

    base_dataset = property(lambda self: self._levels[0].dataset)
    level_instances = property(lambda self: self._levels)
    label_instances = overview_instances = thumbnail_instances = annotation_instances = property(lambda self: [])

    def close(self) -> None:
        pass


def write_dicom_wsi_with_wsidicom(folder: Path, levels: list[np.ndarray], mpp: float, tile: int = TILE,
                                  jpeg2000: bool = False) -> list[Path]:
    """wsidicom writes one VL Whole Slide Microscopy instance per level into `folder` (level i a
    downsample of level 0 as given, level 0 at `mpp` µm/px); jpeg2000: transcoded to JPEG 2000
    lossless. Returns the files, level 0 first."""
    folder.mkdir(parents=True, exist_ok=True)
    transcoding = Jpeg2kSettings(levels=0, channels=Channels.YBR) if jpeg2000 else None
    with WsiDicom(ArraySource(levels, mpp, tile)) as wsi:
        written = wsi.save(folder, workers=1, transcoding=transcoding, include_labels=False,
                           include_overviews=False, include_thumbnails=False)
    paths = [Path(str(p)) for p in written]
    columns = {p: pydicom.dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns for p in paths}
    return sorted(paths, key=lambda p: -columns[p])

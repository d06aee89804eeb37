"""One series in: gather its files, refuse a mix, order the slices, keep at most `max_slices`.

Rules (MedGemma 1.5's CT notebook): slices ordered by InstanceNumber, and with n > max slices the
ones kept are `slices[round(i / max · (n − 1))]` for i = 1..max. Where InstanceNumber is missing
or repeated, the position along the slice normal (ImagePositionPatient · (row × column direction
from ImageOrientationPatient)) orders them instead. Frames of a multi-frame file are slices in
file order.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medgemma_edge.runtime.dicom import offline  # noqa: F401 — before pydicom (see offline.py)

import numpy as np
from pydicom.multival import MultiValue
from pydicom.uid import UID

from medgemma_edge.runtime.dicom.frames import check_frame, no_image_message
from medgemma_edge.runtime.dicom.read import (NOT_PICTURES, Skipped, Source, code, floats, read,
                                              tag)
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.files import note, shown
from medgemma_edge.runtime.images import MAX_PIXELS

MODALITIES = ("CT", "MR", "CR", "DX", "MG", "IO", "PX", "RG", "XA", "RF", "US", "NM", "PT",
              "OT", "XC", "ES", "GM", "SM", "OP", "RTIMAGE", "RTDOSE", "SEG")
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index of files, not an image
# All kept slices together, bounded from the headers before any is decoded: 85 slices of
# 2048×2048 fit (CT and MR are 512 or 1024 square); 85 frames of 16384² from a few MB of RLE
# or deflate would be 23 G pixels.
MAX_SERIES_PIXELS = 4 * MAX_PIXELS
_MAX_NOTES = 20  # skipped files named one per line on stderr; past this, only counted


@dataclass
class Instance:
    source: Source
    ds: object  # pydicom Dataset; its pixel data is read only when `complete`
    complete: bool
    modality: str  # one of MODALITIES, or "" when absent or unknown
    series_uid: str | None  # grouping only: a UID can identify a study, so it is never shown
    series_number: int | None
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    frames: int
    localizer: bool


@dataclass
class Slice:
    instance: Instance
    frame: int  # index into a multi-frame file; 0 for single-frame files


def select_indices(n: int, max_slices: int) -> list[int]:
    """Indices kept of n ordered slices: all when n ≤ max, else round(i/max·(n−1)), i = 1..max."""
    if n <= max_slices:
        return list(range(n))
    # Python's round (half to even) is what the notebook's int(round(...)) does.
    return [round(i / max_slices * (n - 1)) for i in range(1, max_slices + 1)]


def gather(src, max_slices: int) -> list[Slice]:
    """The kept slices of the one series in `src` (a path, a directory, a list, or bytes)."""
    sources = _sources(src)
    # A series that will be kept whole (at most max_slices files, small enough to hold) is read
    # in one pass; anything else by headers first, then only the kept files again.
    whole = len(sources) <= max_slices and _total_bytes(sources) <= WHOLE_READ_BYTES
    instances = _read_instances(sources, describe(src), whole=whole)
    instances = _order(_one_series(instances))
    # Slice i of the whole series lives in the instance whose frame range holds i; found by
    # bisection, since a damaged header may claim millions of frames we never list.
    ends = list(itertools.accumulate(inst.frames for inst in instances))
    kept = []
    for i in select_indices(ends[-1], max_slices):
        k = bisect.bisect_right(ends, i)
        kept.append(Slice(instances[k], i - (ends[k - 1] if k else 0)))
    _check_pixels(kept, describe(src))
    return kept


def _check_pixels(kept: list[Slice], what: str) -> None:
    """Pixels per frame and in all kept slices, from the headers, before anything is decoded."""
    total, largest = 0, 1
    for s in kept:
        source, ds = s.instance.source, s.instance.ds
        rows = tag(ds, "Rows", source, int, 0, strict=False)
        columns = tag(ds, "Columns", source, int, 0, strict=False)
        if rows > 0 and columns > 0:  # else layout() refuses the header before decoding
            check_frame(rows, columns, source)
            total += rows * columns
            largest = max(largest, rows * columns)
    if total > MAX_SERIES_PIXELS:
        fit = max(MAX_SERIES_PIXELS // largest, 1)
        raise InputError(f"{what}: the {len(kept)} slices kept hold {total:,} pixels, over the "
                         f"{MAX_SERIES_PIXELS:,}-pixel limit for one input (decompression-bomb "
                         f"guard) — keep fewer slices, e.g. --max-slices {fit}")


# ---------------------------------------------------------------------------------------------

WHOLE_READ_BYTES = 256 << 20  # a CT series of 85 slices is ~45 MB; radiograph folders can be far more


def _total_bytes(sources: list[Source]) -> int:
    total = 0
    for s in sources:
        try:
            total += len(s.data) if s.data is not None else s.path.stat().st_size
        except OSError:
            return WHOLE_READ_BYTES + 1  # let the header pass report it
    return total


def describe(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return shown(src)
    if isinstance(src, (list, tuple)):
        return f"the {len(src)} files given"
    return "the DICOM data"


def _sources(src) -> list[Source]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return [Source("DICOM bytes", data=bytes(src))]
    if hasattr(src, "read"):
        try:
            data = src.read()
        except Exception as err:
            raise InputError(f"cannot read the DICOM stream ({type(err).__name__}) — pass the "
                             f"file's path or its bytes") from None
        if not isinstance(data, (bytes, bytearray)):
            raise InputError("the DICOM stream gave text, not bytes — open the file in binary "
                             "mode ('rb')")
        return [Source("DICOM stream", data=bytes(data))]
    if isinstance(src, (str, os.PathLike)):
        return _path_sources(src)
    if isinstance(src, (list, tuple)) and src:
        if all(isinstance(p, (bytes, bytearray, memoryview)) for p in src):  # files of one series, as bytes
            return [Source(f"DICOM part {i}", data=bytes(p)) for i, p in enumerate(src, 1)]
        if not all(isinstance(p, (str, os.PathLike)) for p in src):
            raise InputError("a DICOM list must hold file paths or file bytes — pass the files of "
                             "one series")
        return [s for p in src for s in _path_sources(p)]
    raise InputError(f"cannot read DICOM from {type(src).__name__} — pass a file path, a "
                     f"directory holding one series, a list of files, or the file's bytes")


def _path_sources(item) -> list[Source]:
    path = Path(item)
    if not path.is_dir():  # read() opens it and says what is wrong with it, if anything
        return [Source(shown(item), path=path)]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                full = Path(root) / name
                found.append(Source(shown(full), path=full, explicit=False))
    if not found:
        raise InputError(f"{shown(item)}: the directory is empty — point at the directory that "
                         f"holds the series' DICOM files")
    return found


def _read_instances(sources: list[Source], what: str, whole: bool = False) -> list[Instance]:
    # One file (or a series kept whole): read it all now. Else headers only, pixels later.
    header_only = len(sources) > 1 and not whole
    instances, skipped = [], 0
    for source in sources:
        try:
            ds = read(source, header_only=header_only)
            instances.append(_instance(source, ds, complete=not header_only))
        except Skipped as why:
            # Said, not silent: a slice dropped without a word changes the volume.
            skipped += 1
            if skipped <= _MAX_NOTES:
                note(f"{source.name}: skipped — {why}")
    if skipped > _MAX_NOTES:
        note(f"{what}: {skipped - _MAX_NOTES} more files skipped")
    if not instances:
        extra = f" ({skipped} files were not DICOM images)" if skipped else ""
        raise InputError(f"{what}: holds no DICOM images{extra} — point at the directory of "
                         f"one CT, MR or X-ray series")
    return instances


def _instance(source: Source, ds, complete: bool) -> Instance:
    """Header → Instance; Skipped for an object in a directory that is not a picture."""
    sop = str(tag(ds, "SOPClassUID", source, str, "", strict=False))
    modality = code(tag(ds, "Modality", source, str, "", strict=False), MODALITIES, "")
    if not modality and sop:
        modality = _modality_from_class(sop)
    has_pixels = "Rows" in ds or "PixelData" in ds
    if sop == _MEDIA_DIRECTORY or not has_pixels or modality in NOT_PICTURES:
        why = _why_not_a_picture(ds, sop, modality)
        if why and not source.explicit:
            raise Skipped(why)
        if modality in NOT_PICTURES:
            raise InputError(f"{source.name}: this is {NOT_PICTURES[modality]}, not a picture "
                             f"MedGemma reads — pass the images it was made from (e.g. the CT)")
        raise InputError(no_image_message(ds, source))
    image_type = tag(ds, "ImageType", source, _upper_values, [], strict=False)
    return Instance(
        source=source, ds=ds, complete=complete, modality=modality,
        series_uid=tag(ds, "SeriesInstanceUID", source, str, None, strict=False),
        series_number=tag(ds, "SeriesNumber", source, int, None, strict=False),
        instance_number=tag(ds, "InstanceNumber", source, int, None, strict=False),
        position=tag(ds, "ImagePositionPatient", source, floats(3), None, strict=False),
        orientation=tag(ds, "ImageOrientationPatient", source, floats(6), None, strict=False),
        frames=max(tag(ds, "NumberOfFrames", source, int, 1) or 1, 1),
        localizer="LOCALIZER" in image_type,
    )


def _why_not_a_picture(ds, sop: str, modality: str) -> str | None:
    """Why a file found in a directory is left out; None for an image object whose pixels are
    missing: cut short (or stripped), which is an error, as any other damaged slice is."""
    if modality in NOT_PICTURES:
        return NOT_PICTURES[modality]
    if sop == _MEDIA_DIRECTORY:
        return "a DICOMDIR index of files"
    meta = getattr(ds, "file_meta", None) or {}
    try:
        uid = UID(sop or str(meta.get("MediaStorageSOPClassUID", "")))
        name = uid.name if uid.is_valid else ""
    except Exception:
        name = ""
    if "Image Storage" in name:  # a registered class name, never text from the file
        return None
    return "no image in it (a report, plan or other non-image object)"


def _upper_values(value) -> list[str]:
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v).strip().upper() for v in values]


def _modality_from_class(sop: str) -> str:
    try:
        name = UID(sop).name
    except Exception:
        return ""
    for modality in ("CT", "MR"):
        if f"{modality} Image Storage" in name:  # plain, Enhanced and Legacy Converted classes
            return modality
    return ""


def _one_series(instances: list[Instance]) -> list[Instance]:
    groups = Counter(inst.series_uid for inst in instances)
    if len(groups) > 1:
        parts = []
        for uid, count in groups.items():
            inst = next(i for i in instances if i.series_uid == uid)
            label = f"series {inst.series_number}" if inst.series_number is not None else "a series"
            parts.append(f"{label}: {inst.modality or 'unknown modality'}, {count} files")
        raise InputError(f"the input mixes {len(groups)} series ({'; '.join(parts)}) — pass one "
                         f"series at a time: its own directory or its files")
    modalities = {inst.modality for inst in instances}
    if len(modalities) > 1:
        shown = ", ".join(sorted(m or "unknown" for m in modalities))
        raise InputError(f"one series holds several modalities ({shown}) — pass the files of "
                         f"one modality")
    # A scout image filed with the axial slices would become slice 1 of the volume.
    if any(i.localizer for i in instances) and not all(i.localizer for i in instances):
        instances = [i for i in instances if not i.localizer]
    return instances


def _order(instances: list[Instance]) -> list[Instance]:
    numbers = [i.instance_number for i in instances]
    if None not in numbers and len(set(numbers)) == len(numbers):
        return sorted(instances, key=lambda i: i.instance_number)
    orientation = instances[0].orientation
    if orientation is not None and all(i.position is not None for i in instances):
        normal = np.cross(orientation[:3], orientation[3:])
        return sorted(instances, key=lambda i: float(np.dot(i.position, normal)))
    return instances  # directory (path-sorted) or list order

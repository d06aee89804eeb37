"""pydicom at arm's length: read a file, pull the tags we use (frames.py decodes its pixels).

Everything that touches pydicom on untrusted input lives here, so that every failure becomes one
`InputError` line naming the file and, at most, a tag *keyword* — never a tag value, never
`str(dataset)`. pydicom's own warnings and log records can quote values (an invalid birth date,
a too-long name), so they are silenced while we read (`quiet_pydicom`).

Files are opened through runtime/files.py (regular files only, bounded); pydicom never opens a
path itself. Whether bytes are DICOM is decided by their content (raw.looks_like_dicom), never
by the file name. A deflated dataset is inflated here with a bound (raw.inflate), where pydicom
would inflate it in one unbounded call, and a header cut short is reported as truncated.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from medgemma_edge.runtime.dicom import offline  # noqa: F401 — before pydicom (see offline.py)

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue

from medgemma_edge.runtime.dicom.raw import inflate, looks_like_dicom
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.files import NotAFile, open_regular

# Objects that carry pixels but are not pictures MedGemma reads: dose grids and label masks.
NOT_PICTURES = {"RTDOSE": "an RT dose grid", "SEG": "a segmentation mask"}

REDO = "copy it again from the PACS or re-export it"
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # float, double float, pixel data


@dataclass
class Source:
    name: str  # how messages refer to it: the path as given (files.shown), or "DICOM bytes"
    path: Path | None = None
    data: bytes | None = None
    explicit: bool = True  # named by the user; False: found in a directory (skip if not DICOM)


class Skipped(Exception):
    """A file found in a directory that is no DICOM image; the reason is one short phrase, with
    no value from the file, for the note the directory reader prints."""


class _Deflated(Exception):
    """pydicom reached the deflated dataset at `offset` (see _Stream)."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


class _Stream:
    """The file as pydicom reads it. pydicom asks for "all the rest" (read() without a size) in
    one place only: to inflate a deflated dataset in a single unbounded zlib call. That read
    stops pydicom here, once its own file meta reader has decided the syntax, and `read`
    inflates the rest with a bound instead."""

    def __init__(self, fh):
        self._fh = fh

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            raise _Deflated(self._fh.tell())
        return self._fh.read(size)

    def seek(self, *args) -> int:
        return self._fh.seek(*args)

    def tell(self) -> int:
        return self._fh.tell()


# ---------------------------------------------------------------------------------------------
# Silence

_quiet_lock = threading.Lock()
_quiet_depth = 0  # nested/concurrent readers: the outermost one restores the loggers
_quiet_saved: dict[logging.Logger, bool] = {}
_quiet_filters: list = []  # the warning filters to restore when the last reader leaves
# pydicom and its decoder plugins log through child loggers too ("pydicom.pixels.decoders.base");
# a child's records reach the root handlers even when the parent is disabled, so each is.
# highdicom (the node's draft reports) logs the UIDs of the headers it copies at INFO.
_QUIET_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "_openjpeg", "libjpeg", "rle", "highdicom")


def _library_loggers() -> list[logging.Logger]:
    names = {n for n in logging.root.manager.loggerDict if n.split(".")[0] in _QUIET_LOGGERS}
    return [logging.getLogger(n) for n in sorted(names | {"pydicom"})]


@contextlib.contextmanager
def quiet_pydicom():
    """No pydicom warning or log record escapes while reading: they may quote patient values."""
    global _quiet_depth, _quiet_filters
    # One depth count for every thread (the node reads headers on several): the outermost entry
    # silences, the last exit restores. warnings.catch_warnings() per call would not do: it saves
    # and restores the process-wide filter list, so overlapping threads undo each other's silence.
    with _quiet_lock:
        if _quiet_depth == 0:
            for logger in _library_loggers():
                _quiet_saved[logger] = logger.disabled
                logger.disabled = True
            _quiet_filters = warnings.filters[:]
            warnings.simplefilter("ignore")
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for logger, was in _quiet_saved.items():
                    logger.disabled = was
                _quiet_saved.clear()
                warnings.filters[:] = _quiet_filters
                getattr(warnings, "_filters_mutated", lambda: None)()  # what catch_warnings calls on exit


# ---------------------------------------------------------------------------------------------
# Reading

def read(source: Source, *, header_only: bool = False):
    """Dataset of `source`. Raises Skipped for a file found in a directory that is not DICOM
    (or not a regular file); for a file the user named, that is an InputError."""
    try:
        with _opened(source) as (fh, size):
            head = fh.read(132)
            fh.seek(0)
            if not looks_like_dicom(head):  # by content, whatever the file is called
                raise Skipped("not a DICOM file")
            marked = head[128:132] == b"DICM"
            ds = _parse(fh, size, source, header_only, marked)
            if not marked and "SOPClassUID" not in ds and "Rows" not in ds:
                raise Skipped("not a DICOM file")  # looked like a bare dataset, held none
    except NotAFile as err:
        if source.explicit:
            raise
        raise Skipped(err.reason) from None
    except Skipped:
        if source.explicit:
            raise InputError(_NOT_DICOM.format(name=source.name)) from None
        raise
    return _with_transfer_syntax(ds)


_NOT_DICOM = ("{name}: not a DICOM file — pass a DICOM file, a directory holding one series, "
              "or a list of its files")


@contextlib.contextmanager
def _opened(source: Source):
    if source.data is not None:
        yield io.BytesIO(source.data), len(source.data)
    else:
        with open_regular(source.path) as opened:
            yield opened


def _parse(fh, size: int, source: Source, header_only: bool, marked: bool):
    try:
        try:
            # No 'DICM' marker: old exports omit the preamble and file meta; read the bare dataset.
            ds = pydicom.dcmread(_Stream(fh), stop_before_pixels=header_only, force=not marked)
            parts = [ds, getattr(ds, "file_meta", None)]
        except _Deflated as at:
            ds, size = _read_deflated(fh, at.offset, source, header_only)
            parts = [ds]  # its file meta was read whole before the deflated part began
    except (InputError, MemoryError):
        raise
    except OSError as err:
        if err.errno == errno.EIO:  # the disk, not the file; a bad seek is damaged data
            raise InputError(f"{source.name}: cannot read it (I/O error) — check the disk or "
                             f"copy the file again") from None
        raise InputError(_damaged(source, err)) from None
    except Exception as err:  # pydicom raises whatever its parser hit on damaged bytes
        raise InputError(_damaged(source, err)) from None
    # A marked file with file meta and no dataset at all was cut in or right after its meta.
    if _cut_short([p for p in parts if p is not None], size, 132 if marked else 0) or (
            marked and not len(ds)):
        raise InputError(f"{source.name}: the file is truncated (it ends inside its header) — "
                         f"{REDO}")
    return ds


def _read_deflated(fh, offset: int, source: Source, header_only: bool):
    """(dataset, length of its inflated bytes)."""
    fh.seek(0)
    meta = pydicom.dcmread(io.BytesIO(fh.read(offset))).file_meta  # meta alone: nothing to inflate
    data = inflate(fh.read(), source.name)
    ds = read_dataset(io.BytesIO(data), is_implicit_VR=False, is_little_endian=True,
                      stop_when=_at_pixels if header_only else None)
    ds.file_meta = meta
    return ds, len(data)


def _at_pixels(tag, vr, length) -> bool:
    return tag in _PIXEL_TAGS


def _cut_short(datasets: list, size: int, start: int) -> bool:
    """True when the data ends inside an element (of the file meta or the dataset): a value
    longer than what is left, or a few bytes of a tag header after the last element. pydicom
    keeps what it read of a cut file without a word, which looked like a file that "holds no
    image"."""
    last_tell, last_end = -1, None
    pending = list(datasets)
    while pending:
        for tag in (d := pending.pop()).keys():
            element = d.get_item(tag, keep_deferred=True)
            if isinstance(element, RawDataElement):
                end = None if element.length == 0xFFFFFFFF else element.value_tell + element.length
                if end is not None and end > size:
                    return True
                if element.value_tell > last_tell:
                    last_tell, last_end = element.value_tell, end
            elif element is not None and element.VR == "SQ":
                pending.extend(element.value)
    if last_tell < 0:  # no element at all: a marked file that ends at or just after 'DICM'
        return start > 0
    return last_end is not None and 0 < size - last_end < 8


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
            f"(pydicom: {type(err).__name__}) — {REDO}")


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
                         f"fix or remove it (e.g. with dcmodify) or {REDO}") from None


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

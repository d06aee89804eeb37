"""DICOM in, uint8 RGB pictures out — `load_dicom` (see convert.py for the per-modality recipe).

    offline.py  import pydicom without it importing `requests` (whose import opens a socket)
    raw.py      bytes before pydicom: is it DICOM, bounded inflate, a codestream's own size
    read.py     pydicom at arm's length: open and read a file, pull tags by keyword
    frames.py   one frame: the pixel tags checked and bounded, then decoded
    series.py   one series in: gather files, refuse a mix, order slices, keep at most max_slices
    windows.py  CT window presets and the `--window` string (no pydicom: the CLI's help reads it)
    convert.py  `load_dicom`: frames → CT windows / MR range / X-ray VOI window → 8-bit RGB

Nothing here imports runtime/sources.py (which dispatches to this package); `Picture` comes from
the leaf runtime/picture.py.
"""

from __future__ import annotations

__all__ = ["load_dicom"]


def __getattr__(name: str):
    # load_dicom on first use, so that `from medgemma_edge.runtime.dicom.windows import ...` (the
    # CLI's --help) does not pay pydicom's import.
    if name == "load_dicom":
        from medgemma_edge.runtime.dicom.convert import load_dicom

        return load_dicom
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

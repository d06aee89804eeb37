"""DICOM in, pictures out: X-rays, CT and MR windowed the way MedGemma was trained.

`load_dicom` takes a file, a multi-frame file, a directory holding one series, a list of files,
or a file's bytes, and returns uint8 RGB `Picture`s (one per kept slice, labelled `SLICE i`
when there is more than one). Per modality:

- CT: Hounsfield units from RescaleSlope/Intercept, three windows as R, G, B (kernels/window.py;
  presets in runtime/dicom/windows.py).
- MR: one min-max scale over all kept slices together, no window (MR values are relative).
- anything else gray (CR, DX, MG, ...): modality LUT, the file's own VOI window when it has one,
  else the full range of the image; MONOCHROME1 inverted; gray copied to R, G, B.
- colour (RGB, YBR, palette) of any modality: converted to 8-bit RGB.

Google's serving code (Google-Health/medgemma, generic_dicom_handler.py) and CT notebook are
the recipe; docs/dicom.md ("Privacy, errors, no socket") lists which tags are read.
"""

from __future__ import annotations

from dataclasses import dataclass

from medgemma_edge.runtime.dicom import offline  # noqa: F401 — before pydicom (see offline.py)

import numpy as np
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import UID

from medgemma_edge.kernels.window import apply_windows, window_reference
from medgemma_edge.runtime.dicom import series
from medgemma_edge.runtime.dicom.frames import PALETTE, PixelLayout, decode, layout
from medgemma_edge.runtime.dicom.read import Source, finite_float, quiet_pydicom, read, tag
from medgemma_edge.runtime.dicom.windows import DEFAULT_PRESET, parse_window
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.images import out_of_memory_as_input_error
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES, Picture, as_slices


def load_dicom(src, *, window: str | None = None,
               max_slices: int = DEFAULT_MAX_SLICES) -> list[Picture]:
    """DICOM file / directory / list of files / bytes → pictures (see module docstring).

    Gray pictures come back as read-only views showing one plane as R, G and B (as
    runtime.images does); use np.array(picture.pixels) for a writable copy.
    `window` (CT only): a preset name or "lo:hi,lo:hi,lo:hi" in HU; None = MedGemma 1.5's.
    `max_slices`: slices kept from a longer series or multi-frame file, spread by the recipe.
    """
    max_slices = _checked_max_slices(max_slices)
    windows = parse_window(window)  # a bad --window fails before any file is read
    with quiet_pydicom(), out_of_memory_as_input_error(series.describe(src)):
        slices = series.gather(src, max_slices)
        modality = slices[0].instance.modality
        if window is not None and str(window).strip() and modality != "CT":
            shown = f"an {modality} series" if modality else "not CT"
            raise InputError(f"--window sets CT windows, but this is {shown} — leave --window "
                             f"out (MR is min-max scaled; X-rays use the file's own window)")
        frames = _decode_all(slices)
        pixels = _to_rgb(frames, modality, windows)
    # Each picture says which window made it (None: not windowed), so a server can show it.
    used = [((window or "").strip() or DEFAULT_PRESET) if modality == "CT" and not _is_color(f) else None
            for f in frames]
    return as_slices([Picture(p, window=w) for p, w in zip(pixels, used)])


def _checked_max_slices(max_slices) -> int:
    whole = isinstance(max_slices, (int, np.integer)) and not isinstance(max_slices, bool)
    if not whole or max_slices < 1:
        raise InputError(f"max_slices must be a whole number of at least 1, not {max_slices!r} "
                         f"— e.g. --max-slices {DEFAULT_MAX_SLICES}")
    return int(max_slices)


# ---------------------------------------------------------------------------------------------
# Decoding

@dataclass
class _Frame:
    """One decoded slice and what is needed to turn it into 8 bits."""

    arr: np.ndarray  # (rows, cols) stored values, or (rows, cols, 3) RGB
    ds: object  # its pydicom Dataset: rescale, window, palette
    frame: int  # index in a multi-frame file (per-frame functional groups)
    pixels: PixelLayout
    source: Source


def _decode_all(slices) -> list[_Frame]:
    datasets: dict[int, tuple] = {}  # a multi-frame file is read once for all its kept frames
    out = []
    for s in slices:
        inst = s.instance
        if id(inst) not in datasets:
            ds = inst.ds if inst.complete else read(inst.source)
            datasets[id(inst)] = (ds, layout(ds, inst.source))
        ds, pixels = datasets[id(inst)]
        if s.frame >= pixels.frames:
            raise InputError(f"{inst.source.name}: NumberOfFrames changed between reads — "
                             f"the file is being written to; try again when it is complete")
        out.append(_Frame(decode(ds, s.frame, pixels, inst.source), ds, s.frame, pixels,
                          inst.source))
    return out


def _frame_value(f: _Frame, macro: str, keyword: str, convert, *, strict: bool):
    """`keyword` from the top level, else from the frame's functional groups (enhanced
    multi-frame files keep rescale and window per frame or shared)."""
    value = tag(f.ds, keyword, f.source, convert, None, strict=strict)
    if value is not None:
        return value
    for groups, index in (("PerFrameFunctionalGroupsSequence", f.frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        try:
            item = getattr(f.ds, groups)[index]
            value = tag(getattr(item, macro)[0], keyword, f.source, convert, None,
                        strict=strict)
        except (AttributeError, IndexError, TypeError):
            continue
        if value is not None:
            return value
    return None


def _rescale(f: _Frame) -> tuple[float, float] | None:
    """(slope, intercept), or None when the file gives neither."""
    macro = "PixelValueTransformationSequence"
    slope = _frame_value(f, macro, "RescaleSlope", finite_float, strict=True)
    intercept = _frame_value(f, macro, "RescaleIntercept", finite_float, strict=True)
    if slope is None and intercept is None:
        return None
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def _modality_values(f: _Frame) -> np.ndarray:
    """Stored values → modality values (HU for CT): rescale, else a Modality LUT Sequence."""
    rescale = _rescale(f)
    if rescale is not None:
        values = f.arr.astype(np.float64) * rescale[0]
        values += rescale[1]
        return values
    if "ModalityLUTSequence" in f.ds:
        try:
            return apply_modality_lut(f.arr, f.ds)
        except Exception:
            raise InputError(f"{f.source.name}: the Modality LUT Sequence cannot be applied — "
                             f"the file is damaged; remove the LUT or re-export it") from None
    return f.arr


# ---------------------------------------------------------------------------------------------
# To 8-bit RGB

def _to_rgb(frames: list[_Frame], modality: str, windows) -> list[np.ndarray]:
    gray = [f for f in frames if not _is_color(f)]
    mr_range = _series_range(gray) if modality == "MR" and gray else None
    out = []
    for f in frames:
        if _is_color(f):
            out.append(_color(f))
        elif modality == "CT":
            out.append(_ct(f, windows))
        else:
            g = _gray(f, mr_range, invert=f.pixels.photometric == "MONOCHROME1")
            out.append(np.broadcast_to(g[:, :, None], g.shape + (3,)))  # gray as RGB, channel stride 0
    return out


def _is_color(f: _Frame) -> bool:
    return f.arr.ndim == 3 or f.pixels.photometric == PALETTE


def _gray(f: _Frame, mr_range: tuple[float, float] | None, invert: bool = False) -> np.ndarray:
    """One gray frame → (rows, cols) uint8: the MR series range, else the file's VOI window, else
    the image's own range, in float64. (A table of every stored value gave the same bytes a little
    sooner on an X-ray and a little later on an MR series; against an image encode it did not pay
    for its upkeep.)"""
    values = _modality_values(f)
    window = mr_range if mr_range is not None else _voi_window(f)
    if window is None and values is f.arr and _display_ready(f):
        out = f.arr
    else:
        out = _scale(values, *(window or (float(values.min()), float(values.max()))))
    return 255 - out if invert else out


def _display_ready(f: _Frame) -> bool:
    """8-bit pictures with no rescale and no window are display values already; stretching them
    would change a picture that is fine (Google's serving code keeps them as well)."""
    return f.arr.dtype == np.uint8 and f.pixels.bits_stored == 8


def _ct(f: _Frame, windows) -> np.ndarray:
    rescale = _rescale(f)
    if rescale is None and "ModalityLUTSequence" in f.ds:
        return window_reference(_modality_values(f), windows)
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    return apply_windows(f.arr, windows, slope, intercept)


def _series_range(frames: list[_Frame]) -> tuple[float, float]:
    lo, hi = np.inf, -np.inf
    for f in frames:
        values = _modality_values(f)
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return lo, hi


def _voi_window(f: _Frame) -> tuple[float, float] | None:
    """The file's VOI window as (lo, hi): centre ± width/2, the range Google's serving code
    settled on (window_accurate). A window that will not parse counts as none."""
    macro = "FrameVOILUTSequence"
    center = _frame_value(f, macro, "WindowCenter", finite_float, strict=False)
    width = _frame_value(f, macro, "WindowWidth", finite_float, strict=False)
    if center is None or width is None or not width > 0:
        return None
    return center - width / 2, center + width / 2


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """clip to [lo, hi], map linearly onto 0..255, round half to even (float64 throughout)."""
    if not hi > lo:
        return np.zeros(values.shape, np.uint8)
    x = np.clip(values, lo, hi).astype(np.float64, copy=False)  # clip made a new array: work in it
    x -= lo
    x /= hi - lo
    x *= 255.0
    return np.round(x, out=x).astype(np.uint8)


def _color(f: _Frame) -> np.ndarray:
    arr = f.arr
    if f.pixels.photometric == PALETTE:
        return _palette(f)
    if arr.dtype == np.uint8:
        return arr
    top = float(2 ** min(f.pixels.bits_stored or 8 * arr.itemsize, 8 * arr.itemsize) - 1)
    return _scale(arr, 0.0, top)


_PALETTE_DAMAGED = "the palette colour table is missing or damaged — re-export the image as RGB"


def _palette(f: _Frame) -> np.ndarray:
    """PALETTE COLOR → RGB through the file's tables, each entry scaled from the bits the LUT
    Descriptor declares (its third value) to 8. Entries are stored in 8 or 16 bits whatever
    they declare (PS3.3 C.7.6.3.1.5 notes 8-bit entries in 16 bits), so shifting every 16-bit
    table right by 8 made such a picture black."""
    ds, name = f.ds, f.source.name
    try:
        entries, first_map, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
        entries = entries or 65536  # 0 means 2**16 entries
        if "RedPaletteColorLookupTableData" in ds:
            little = _little_endian(ds)
            data = [ds[f"{c}PaletteColorLookupTableData"].value for c in ("Red", "Green", "Blue")]
            tables = np.stack([_table(d, entries, little) for d in data], axis=1)  # (entries, 3)
        else:  # segmented tables: pydicom expands them, in the file's byte order
            tables = apply_color_lut(np.arange(first_map, first_map + entries), ds)[:, :3]
    except Exception:
        raise InputError(f"{name}: {_PALETTE_DAMAGED}") from None
    if not 8 <= bits <= 16 or len(tables) != entries or int(tables.max()) >= 1 << bits:
        raise InputError(f"{name}: {_PALETTE_DAMAGED}")
    tables = (tables.astype(np.uint16) >> (bits - 8)).astype(np.uint8)
    index = f.arr if first_map == 0 else f.arr.astype(np.int32) - first_map
    return np.take(tables, index, axis=0, mode="clip")  # beyond the table: its first/last entry


def _table(value, entries: int, little: bool) -> np.ndarray:
    if not isinstance(value, (bytes, bytearray)):  # read as US: already numbers
        return np.asarray(value, dtype=np.int64).reshape(-1)
    width = len(value) // entries  # bytes per entry, whatever the descriptor declares
    if width not in (1, 2) or len(value) != width * entries:
        raise ValueError("table length")
    return np.frombuffer(value, np.uint8 if width == 1 else ("<u2" if little else ">u2"))


def _little_endian(ds) -> bool:
    """The byte order the dataset was stored in: OW table data is kept as the file's bytes."""
    little = getattr(ds, "original_encoding", (None, None))[1]
    if little is None:
        little = UID(str(ds.file_meta.TransferSyntaxUID)).is_little_endian
    return bool(little)

"""CT window presets and the `--window` string.

A CT picture for MedGemma is three windows packed into R, G, B (see kernels/window.py). `--window`
takes a preset name below or explicit ranges in HU: "lo:hi,lo:hi,lo:hi" (R, G, B), or one
"lo:hi" used for all three channels (a gray picture).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medgemma_edge.runtime.errors import InputError

Window = tuple[float, float]  # (lo, hi) in Hounsfield units


@dataclass(frozen=True)
class Preset:
    windows: tuple[Window, Window, Window]  # R, G, B
    source: str  # where the numbers come from, shown in docs/dicom.md and `describe_presets`


def _gray(center: float, width: float) -> tuple[Window, Window, Window]:
    # Reading-room windows are quoted as level/width; one window in all channels = a gray image.
    lo, hi = center - width / 2, center + width / 2
    return ((lo, hi), (lo, hi), (lo, hi))


_NOTEBOOK = "Google-Health/medgemma notebooks/high_dimensional_ct_hugging_face.ipynb"
_SERVING = ("Google-Health/medgemma python/data_accessors/local_file_handlers/"
            "generic_dicom_handler.py (_MEDGEMMA_1_CT_DEFAULT_WINDOW)")
_RADIOPAEDIA = "Radiopaedia, 'Windowing (CT)', usual level/width"

PRESETS: dict[str, Preset] = {
    # What MedGemma 1.5 was trained on: wide, soft tissue, brain.
    "medgemma-1.5": Preset(((-1024, 1024), (-135, 215), (0, 80)),
                           f"{_NOTEBOOK} (the windows documented with the 1.5 release)"),
    # Google's serving code writes the green window as centre 175 / width 80: 135..215 HU.
    "medgemma-1.0": Preset(((-1024, 1024), (135, 215), (0, 80)),
                           f"{_SERVING}: centre/width 0/2048, 175/80, 40/80"),
    # Single reading-room windows, for a person looking at a preview; MedGemma was not trained
    # on gray CT, so answers on these are off the recipe.
    "brain": Preset(_gray(40, 80), f"{_RADIOPAEDIA}: L 40 / W 80 (gray)"),
    "lung": Preset(_gray(-600, 1500), f"{_RADIOPAEDIA}: L -600 / W 1500 (gray)"),
    "mediastinum": Preset(_gray(50, 350), f"{_RADIOPAEDIA}: L 50 / W 350 (gray)"),
    "abdomen": Preset(_gray(50, 400), f"{_RADIOPAEDIA}: L 50 / W 400 (gray)"),
    "liver": Preset(_gray(30, 150), f"{_RADIOPAEDIA}: L 30 / W 150 (gray)"),
    "bone": Preset(_gray(400, 1800), f"{_RADIOPAEDIA}: L 400 / W 1800 (gray)"),
}
DEFAULT_PRESET = "medgemma-1.5"
PRESET_NAMES = tuple(PRESETS)

# The `--window` help of every command that takes it (ask, preprocess, preview): one wording.
WINDOW_HELP = (f"CT window preset: {', '.join(PRESET_NAMES)} (default {DEFAULT_PRESET}); or HU "
               'ranges "lo:hi,lo:hi,lo:hi" (R, G, B), or one "lo:hi" (gray). DICOM CT only')

_SYNTAX = ('a preset name or HU ranges "lo:hi,lo:hi,lo:hi" (R, G, B), e.g. '
           '"-1024:1024,-135:215,0:80"')


def describe_presets() -> str:
    """One line per preset: name, R/G/B ranges, source. For `--help` and docs/dicom.md."""
    lines = []
    for name, preset in PRESETS.items():
        ranges = ", ".join(f"{lo:g}..{hi:g}" for lo, hi in preset.windows)
        default = " (default)" if name == DEFAULT_PRESET else ""
        lines.append(f"{name}{default}: {ranges} HU — {preset.source}")
    return "\n".join(lines)


def parse_window(text: str | None) -> tuple[Window, Window, Window]:
    """`--window` value → three (lo, hi) HU ranges for R, G, B. None or "" → the default."""
    if text is None or not str(text).strip():
        return PRESETS[DEFAULT_PRESET].windows
    if not isinstance(text, str):
        raise InputError(f"--window must be text — give {_SYNTAX}")
    name = text.strip().lower()
    if name in PRESETS:
        return PRESETS[name].windows
    if ":" not in name:
        names = ", ".join(PRESETS)
        raise InputError(f"unknown CT window preset {text.strip()!r} — use one of {names}, "
                         f"or HU ranges like \"-1024:1024,-135:215,0:80\"")
    windows = tuple(_parse_range(part, text) for part in name.split(","))
    if len(windows) == 1:
        return windows * 3
    if len(windows) != 3:
        raise InputError(f"--window {text!r} has {len(windows)} ranges — give one (gray) or "
                         f"three (R, G, B), e.g. \"-1024:1024,-135:215,0:80\"")
    return windows


def _parse_range(part: str, text: str) -> Window:
    pieces = part.split(":")
    try:
        if len(pieces) != 2:
            raise ValueError
        lo, hi = float(pieces[0]), float(pieces[1])
    except ValueError:
        raise InputError(f"--window {text!r}: {part.strip()!r} is not lo:hi — "
                         f"give {_SYNTAX}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise InputError(f"--window {text!r}: range {part.strip()!r} needs finite lo < hi — "
                         f"e.g. \"-135:215\"")
    return (lo, hi)

"""MedGemma 1.5's box localization, back on the picture the user gave.

The model answers boxes as `"box_2d": [y0, x0, y1, x1]` on a 0–1000 scale of the square view it
saw (runtime/preprocess.model_view, 896² by default). That view is the original fitted to a square
first, so the scale is undone per fit mode:

    pad      the picture sits centred in a black square of side max(H, W) (odd remainders go to the
             bottom/right, as preprocess.fit_square puts them): x = b/1000·side − left
    stretch  the picture was squashed to the square: x = b/1000·W, y = b/1000·H

(exactly preprocess.FITS). The view's pixel size drops out (every resize is uniform), so only the
original's H×W and the fit are needed; the model learns the H×W while it decodes the pictures for
the prompt, and its last streamed `Response` carries the boxes already mapped (runtime/model.py),
so nothing decodes a picture twice. Coordinates are pixel edges (0..W, 0..H), clipped to the
picture: a box reaching into the padding ends at the picture's border.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.preprocess import FITS

SCALE = 1000  # box_2d values are thousandths of the model's square view
_BOX_TEXT = re.compile(r'"?box_2d"?\s*[:=]\s*\[\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*,'
                       r'\s*([-+\d.eE]+)\s*\]')
_LABEL_AFTER = re.compile(r'^\s*,\s*"label"\s*:\s*"((?:[^"\\]|\\.)*)"')
_LABEL_BEFORE = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*$')


@dataclass(frozen=True)
class Box:
    label: str | None
    box_2d: tuple[float, float, float, float]  # (y0, x0, y1, x1), 0–1000 of the model's view, as answered
    xyxy: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels of the original picture (PIL's order)
    image_size: tuple[int, int]  # (W, H) of the original picture

    def as_dict(self) -> dict:
        return {"label": self.label, "box_2d": list(self.box_2d), "xyxy": list(self.xyxy),
                "image_size": list(self.image_size)}

    def describe(self) -> str:
        """One line for a person: the box as answered and on the W×H original."""
        view = ", ".join(_short(v) for v in self.box_2d)
        pixels = ",".join(_short(v) for v in self.xyxy)
        width, height = self.image_size
        return (f"box {json.dumps(self.label, ensure_ascii=False) if self.label is not None else '(no label)'}: "
                f"box_2d [{view}] (y0, x0, y1, x1 of {SCALE}) = x0,y0,x1,y1 {pixels} px "
                f"of the {width}×{height} original")


def _short(v: float) -> str:
    return f"{v:.1f}".removesuffix(".0")


def parse_boxes(answer: str) -> list[tuple[str | None, tuple[float, float, float, float]]]:
    """(label, (y0, x0, y1, x1)) of every box_2d in an answer: JSON (an object, a list of objects,
    a ```json block) or, failing that, `"box_2d": [...]` spans in free text."""
    if not isinstance(answer, str):
        raise InputError(f"the answer must be text, got {type(answer).__name__}")
    found: list = []
    for block in _json_candidates(answer):
        try:
            _collect(json.loads(block), found)
        except ValueError:
            continue
        if found:
            return found
    for match in _BOX_TEXT.finditer(answer):
        label = _LABEL_AFTER.match(answer[match.end():]) or _LABEL_BEFORE.search(answer[:match.start()][-200:])
        try:
            box = tuple(float(v) for v in match.groups())
        except ValueError:
            continue
        found.append((json.loads(f'"{label.group(1)}"') if label else None, box))
    return found


def _json_candidates(text: str) -> list[str]:
    fenced = re.findall(r"```(?:json)?\s*(.*?)```", text, flags=re.DOTALL)
    return fenced + [text.strip()]


def _collect(node, found: list) -> None:
    if isinstance(node, list):
        for item in node:
            _collect(item, found)
    elif isinstance(node, dict):
        box = node.get("box_2d")
        if isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            label = node.get("label")
            found.append((label if isinstance(label, str) else None, tuple(float(v) for v in box)))
        for key, value in node.items():
            if key != "box_2d":
                _collect(value, found)


def to_original(box_2d, height: int, width: int, fit: str = "pad") -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) pixels of the original H×W picture for a (y0, x0, y1, x1) 0–1000 box."""
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r:.20} — use one of {', '.join(FITS)}")
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise InputError(f"the picture size must be positive integers, got {height!r:.20}×{width!r:.20}")
    y0, x0, y1, x1 = (float(v) / SCALE for v in box_2d)
    y0, y1 = sorted((y0, y1))
    x0, x1 = sorted((x0, x1))
    if fit == "stretch":
        sx, sy, left, top = width, height, 0, 0
    else:  # pad
        side = max(height, width)
        sx = sy = side
        left, top = -((side - width) // 2), -((side - height) // 2)
    clip = lambda v, hi: min(max(v, 0.0), float(hi))
    return (clip(x0 * sx + left, width), clip(y0 * sy + top, height),
            clip(x1 * sx + left, width), clip(y1 * sy + top, height))


def boxes_on_original(answer: str, height: int, width: int, fit: str = "pad") -> list[Box]:
    """Every box_2d of `answer`, on both scales, for a picture of H×W fitted with `fit`."""
    return [Box(label, box, to_original(box, height, width, fit), (width, height))
            for label, box in parse_boxes(answer)]


def answer_boxes(answer: str, sizes, fit: str) -> list[Box]:
    """The boxes of `answer` on the original picture when the chat's images were one picture:
    `sizes` holds, per image item of the chat, the (H, W) of each picture it decoded to (a series:
    several; runtime/prefill.Prompt.sizes). Two images, or a series, give none: a box_2d names no
    picture among several. `fit`: the one the model's view was made with."""
    if len(sizes) != 1 or len(sizes[0]) != 1:
        return []
    height, width = sizes[0][0]
    return boxes_on_original(answer, int(height), int(width), fit)

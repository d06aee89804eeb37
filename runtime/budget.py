"""How many CT/MR slices fit a time budget on this machine.

On a CPU the 4B vision tower takes many seconds per slice (benchmarks/results/REPORT.md), so
MedGemma 1.5's 85 slices take long. `ask --budget SECONDS` keeps the recipe's sampling rule
(runtime/dicom/series.py `select_indices`) but chooses the count: the largest one whose slices
not yet in the image cache fit the budget at the encode speed measured on this machine (a cached
slice costs nothing). The speed is the mean of the last encodes of this vision file with this
thread count, kept in the cache folder; before any, the first chosen slice is encoded and timed.

The plan decodes the series once, every slice, and hands the kept ones on (`SlicePlan.pictures`,
given to the chat as the image): the answer reads the very pixels whose cache entries the plan
counted, and nothing decodes the series again. For CT, X-ray and colour those are the bytes a
decode of only the kept slices gives (a slice's pixels depend on that slice alone). An MR series is
min-max scaled over the slices decoded together, here the whole series: a slice then looks the same
whatever count the budget keeps, so its cached embedding serves every later plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from medgemma_edge.runtime.cache import read_record, write_record
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES, Picture, as_slices

SPEED_FILE = "encode-speed.json"
KEEP = 8  # encodes averaged per vision file and thread count
EVERY_SLICE = 10**6


class EncodeSpeed:
    """Seconds per image encode, measured on this machine, remembered in the cache folder."""

    def __init__(self, root: Path | None, vision_id: str, threads: int):
        self.path = root / SPEED_FILE if root is not None else None
        self.key = f"{vision_id[:16]}:{threads}"  # vision_id: the file's sha256 (or its path)

    def _all(self) -> dict:
        return read_record(self.path) if self.path is not None else {}

    def _times(self) -> list[float]:
        times = self._all().get(self.key)
        ok = isinstance(times, list) and times and all(isinstance(t, (int, float)) and t > 0 for t in times)
        return times if ok else []

    def seconds(self) -> float | None:
        """The mean of the last encodes: what a budget should expect."""
        times = self._times()
        return sum(times) / len(times) if times else None

    def best(self) -> float | None:
        """The fastest remembered encode: what this machine can do, little moved by an encode that
        ran beside other work (runtime/vision_choice compares paths with it)."""
        return min(self._times(), default=None)

    def record(self, seconds: float) -> None:
        if self.path is None:
            return
        data = self._all()
        data[self.key] = ([t for t in data.get(self.key, []) if isinstance(t, (int, float))] + [seconds])[-KEEP:]
        write_record(self.path, data)  # unwritable: unmeasured next time, one slice is timed again


@dataclass
class SlicePlan:
    slices: int  # how many to keep (the sampling rule picks which)
    total: int  # slices in the series
    to_encode: int  # of the kept ones, not in the image cache
    expected_s: float  # encode time expected for them
    seconds_per_image: float
    pictures: list[Picture]  # the kept slices, decoded: the chat's image item (sources.load_pictures takes them)

    def describe(self, budget_s: float) -> str:
        return (f"budget {budget_s:.0f} s: {self.slices} of {self.total} slices, {self.to_encode} to encode at "
                f"{self.seconds_per_image:.1f} s each on this machine (about {self.expected_s:.0f} s)")


def plan_slices(model, src, budget_s: float, *, window=None, fit=None,
                max_slices: int = DEFAULT_MAX_SLICES, level: int | None = None) -> SlicePlan:
    """The slices of `src` (a series) that fit `budget_s` seconds of image encoding, decoded; for
    a whole-slide image (level: its --level), its tissue patches (`plan_patches`)."""
    from medgemma_edge.runtime.wsi import slide_path

    if slide_path(src) is not None:
        return plan_patches(model, src, budget_s, fit=fit, max_slices=max_slices, level=level)
    from medgemma_edge.runtime.dicom.series import select_indices  # pydicom: only for a series
    from medgemma_edge.runtime.embed_cache import pixel_digest
    from medgemma_edge.runtime.preprocess import model_view
    from medgemma_edge.runtime.sources import load_pictures

    if not budget_s > 0:
        raise InputError("--budget must be a positive number of seconds")
    pictures = load_pictures(src, window=window, max_slices=EVERY_SLICE)
    views = model_view(pictures, model.image_size, fit or model.fit, threads=model.threads)
    cached = [model.image_cache.get(pixel_digest(v))[0] is not None for v in views] if model.image_cache else \
        [False] * len(views)
    per_image = model.encode_speed.seconds()
    if per_image is None:  # measure on a slice every choice of count contains: the last one
        model.image_embeddings(views[-1])
        cached[-1] = True
        per_image = model.encode_speed.seconds() or 60.0
    best = None
    for count in range(1, min(max_slices, len(views)) + 1):
        kept = select_indices(len(views), count)
        missing = sum(not cached[i] for i in kept)
        if best is None or missing * per_image <= budget_s:
            best = count, kept, missing
    count, kept, missing = best
    return SlicePlan(count, len(views), missing, missing * per_image, per_image,
                     as_slices([pictures[i] for i in kept]))


def plan_patches(model, src, budget_s: float, *, fit=None, max_slices: int = DEFAULT_MAX_SLICES,
                 level: int | None = None) -> SlicePlan:
    """The tissue patches of the slide `src` that fit `budget_s` seconds: as many as the budget
    pays for at this machine's speed (at most the usual cap), sampled as without a budget. Unlike a
    series, patches are not decoded beyond those kept (a slide can hold thousands), so patches in
    the image cache are counted in `to_encode` only after the choice: the count is conservative."""
    from medgemma_edge.runtime.embed_cache import pixel_digest
    from medgemma_edge.runtime.preprocess import model_view
    from medgemma_edge.runtime.wsi import patch_cap, plan_slide, read_patches
    from medgemma_edge.runtime.wsi.tissue import sample_patches

    if not budget_s > 0:
        raise InputError("--budget must be a positive number of seconds")
    plan = plan_slide(src, max_slices=max_slices, level=level)
    per_image = model.encode_speed.seconds()
    if per_image is None:  # time one patch: the first sampled one
        first = model_view(read_patches(replace(plan, sampled=plan.sampled[:1])), model.image_size,
                           fit or model.fit, threads=model.threads)
        model.image_embeddings(first[0])
        per_image = model.encode_speed.seconds() or 60.0
    count = max(1, min(patch_cap(max_slices), len(plan.tissue), int(budget_s // per_image)))
    plan = replace(plan, sampled=sample_patches(plan.tissue, count))
    pictures = read_patches(plan)
    views = model_view(pictures, model.image_size, fit or model.fit, threads=model.threads)
    missing = sum(model.image_cache is None or model.image_cache.get(pixel_digest(v))[0] is None for v in views)
    return SlicePlan(len(pictures), len(plan.tissue), missing, missing * per_image, per_image, pictures)

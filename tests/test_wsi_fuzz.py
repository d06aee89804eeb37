"""Fuzz: small whole-slide images (an Aperio TIFF and a DICOM WSI series), cut short and mutated;
every case must end, within 20 s, in pictures or the project's own one-line InputError — never
another exception, never a hang.

Mutations are byte-level: a cut at a random place, flipped bytes anywhere, 4-byte words
overwritten with telling values (0, 0xFFFFFFFF, a huge offset) in the head (the TIFF header and
first tags, the DICOM meta header) and in the tail (where tifffile writes the last IFDs).
Derandomized (random.Random(case)), so a CI failure reproduces; MEDGEMMA_WSI_FUZZ sets the count.
"""

from __future__ import annotations

import os
import random
import struct
import threading

import numpy as np
import pytest

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.sources import load_pictures
from tests.wsi_helpers import aperio_description, block_mean, patch_level_image, write_dicom_wsi, write_tiff_slide

CASES = int(os.environ.get("MEDGEMMA_WSI_FUZZ", "100"))
TIMEOUT_S = 20
_WORDS = [0, 0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 1]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi-seeds")
    level0 = patch_level_image(2048, 1536, seed=3)
    tiff = write_tiff_slide(root / "small.svs", [level0, block_mean(level0, 4), block_mean(level0, 16)],
                            aperio_description(2048, 1536, 20, 0.5))
    dicom = write_dicom_wsi(root / "dcm", [level0[:1024, :1024], block_mean(level0[:1024, :1024], 4)], mpp=1.0,
                            tile=128)
    assert len(load_pictures(str(tiff))) > 0 and len(load_pictures(str(root / "dcm"))) > 0
    return {"svs": tiff.read_bytes(), "dcm0": dicom[0].read_bytes(), "dcm1": dicom[1].read_bytes()}


def _mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    kind = rng.choice(["cut", "flip", "head", "tail"])
    if kind == "cut":
        at = rng.randrange(8, len(out))
        return bytes(out[:at]), f"cut at {at}"
    if kind == "flip":
        places = [rng.randrange(len(out)) for _ in range(rng.randint(1, 40))]
        for p in places:
            out[p] ^= 1 << rng.randrange(8)
        return bytes(out), f"flip {len(places)} bits"
    span = (4, min(len(out) - 4, 2048)) if kind == "head" else (max(4, len(out) - 4096), len(out) - 4)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(*span)
        out[at:at + 4] = struct.pack("<I", rng.choice(_WORDS + [rng.getrandbits(32)]))
    return bytes(out), f"overwrite words in the {kind}"


def _run(path: str):
    """('ok', n) | ('input', message) | ('other', repr) | ('hang', None), the load run in a thread."""
    result = []

    def target():
        try:
            result.append(("ok", len(load_pictures(path, max_slices=4))))
        except InputError as err:
            result.append(("input", str(err)))
        except BaseException as err:  # noqa: BLE001 — what the test is looking for
            result.append(("other", repr(err)))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    return result[0] if result else ("hang", None)


def test_mutated_slides_end_in_pictures_or_one_line(seeds, tmp_path):
    tally = {"ok": 0, "input": 0}
    for case in range(CASES):
        rng = random.Random(case)
        which = rng.choice(["svs", "svs", "dcm0", "dcm1"])
        data, how = _mutate(seeds[which], rng)
        if which == "svs":
            path = tmp_path / f"case{case}.svs"
            path.write_bytes(data)
        else:
            folder = tmp_path / f"case{case}"
            folder.mkdir()
            for name in ("dcm0", "dcm1"):
                (folder / f"{name}.dcm").write_bytes(data if name == which else seeds[name])
            path = folder
        kind, detail = _run(str(path))
        assert kind in ("ok", "input"), f"case {case} ({which}, {how}): {kind} {detail}"
        if kind == "input":
            assert "\n" not in detail and len(detail) < 400, f"case {case}: {detail!r}"
        tally[kind] += 1
    print(f"{CASES} cases: {tally['ok']} decoded, {tally['input']} refused in one line")

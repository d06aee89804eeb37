"""Fuzz: real DICOM bytes from pydicom's test files, mutated; every input must end, within 5 s,
in decoded pictures or the project's own InputError — never another exception, never a hang.

Seeds also cover issue 12's classes, built here: decompression bombs whose headers claim huge
frames (RLE, deflate, JPEG / JPEG-LS / JPEG 2000 codestreams that lie about their size), big- and
little-endian palette tables, files without preamble, a header cut short. A second test fuzzes
series folders: good slices mixed with FIFOs, device links, dangling links, preamble-less,
truncated and mutated slices, junk, pictures named .dcm, and names holding control characters.
Both run under a memory limit (dicom_helpers.memory_headroom), so a bomb that slips through
fails the test instead of swapping the machine.

Mutations are byte-level (flip, overwrite, cut, delete, insert), aimed at the pixel data (the
codecs' input), and aimed at tags: the bytes right after the header of a tag the loader relies
on (Rows, BitsAllocated, PhotometricInterpretation, the transfer syntax, the pixel data's
length, ...) are overwritten with random or telling values.
Seeds are small files: the default 2000 examples (and 150 folders) take ~25 s on two cores; set
MEDGEMMA_FUZZ_EXAMPLES / MEDGEMMA_FUZZ_FOLDERS to run more (derandomized, so a CI failure
reproduces).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import os
import struct
import tempfile
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from medgemma_edge.runtime.dicom import load_dicom
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.sources import load_pictures
from tests.dicom_helpers import (bare, codestream_liar, deflated_dicom, image_dataset,
                                 memory_headroom, palette_dataset, palette_tables, rle_dicom,
                                 save, slice_pixels, write_series)

SEEDS = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
         "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_implicit.dcm",
         "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_jpeg.dcm", "SC_rgb_rle.dcm",
         "SC_rgb_rle_2frame.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm",
         "JPEG2000.dcm", "JPEGLSNearLossless_08.dcm", "SC_rgb_gdcm_KY.dcm",
         "SC_rgb_jls_lossy_line.dcm", "rtplan.dcm", "reportsi.dcm"]
SEED_BYTES = {name: open(get_testdata_file(name), "rb").read() for name in SEEDS}


def _dataset_bytes(ds, little: bool = True) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=little, enforce_file_format=True)
    return out.getvalue()


def _built_seeds() -> dict[str, bytes]:
    """Issue 12's classes, small on disk; the bombs claim their size in the header only (the
    real ones, which inflate or decode to GBs, are in test_hostile_files.py)."""
    index = np.arange(256, dtype=np.uint8).reshape(8, 32)
    ct = SEED_BYTES["MR_small.dcm"]
    return {
        "bomb: RLE claims 16384²": rle_dicom(16384, 16384, encoded=(16, 16)),
        "bomb: RLE claims 30 × 4096²": rle_dicom(4096, 4096, frames=30, encoded=(8, 8)),
        "bomb: deflate claims 16384²": deflated_dicom(16384, 16384, pixel_bytes=4096),
        "deflate: small, valid": deflated_dicom(24, 40),
        "bomb: JPEG SOF claims 60000²": codestream_liar("SC_rgb_jpeg_dcmtk.dcm"),
        "bomb: JPEG-LS SOF claims 60000²": codestream_liar("MR_small_jpeg_ls_lossless.dcm"),
        "bomb: J2K SIZ claims 60000²": codestream_liar("MR_small_jp2klossless.dcm"),
        "palette: big endian, 16-bit": _dataset_bytes(
            palette_dataset(index, palette_tables(16), little=False), little=False),
        "palette: 8-bit entries in 16": _dataset_bytes(
            palette_dataset(index, palette_tables(8), bits=8, width=2)),
        "no preamble: implicit": bare("MR_small.dcm"),
        "no preamble: explicit": bare("CT_small.dcm", implicit=False),
        "truncated header": ct[:ct.index(b"\xe0\x7f\x10\x00") // 2],
    }


BUILT = _built_seeds()
SEED_BYTES.update(BUILT)
SEEDS = SEEDS + list(BUILT)

# (group, element) of tags the loader reads; found in either byte order.
TAGS = [(0x0002, 0x0010), (0x0008, 0x0016), (0x0008, 0x0060), (0x0020, 0x000E),
        (0x0020, 0x0013), (0x0020, 0x0032), (0x0028, 0x0002), (0x0028, 0x0004),
        (0x0028, 0x0008), (0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100),
        (0x0028, 0x0101), (0x0028, 0x0102), (0x0028, 0x0103), (0x0028, 0x1050),
        (0x0028, 0x1051), (0x0028, 0x1052), (0x0028, 0x1053), (0x7FE0, 0x0010)]
TELLING = [b"\x00\x00", b"\x01\x00", b"\xff\xff", b"\x00\x80", b"\x10\x00", b"\x08\x00",
           b"\x20\x00", b"\xff\xff\xff\xff", b"MONOCHROME1 ", b"RGB ", b"PALETTE COLOR ",
           b"YBR_FULL_422", b"HSV ", b"1A", b"0 ", b"-1", b"99999999", b"1.2.840.10008.1.2.5\x00",
           b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.1.99", b"CT", b"MR", b"\x00" * 8]

EXAMPLES = int(os.environ.get("MEDGEMMA_FUZZ_EXAMPLES", "2000"))
TIME_LIMIT_S = 5.0


def tag_offsets(data: bytes) -> list[int]:
    """Offsets just past each known tag header, as many as occur."""
    found = []
    for group, element in TAGS:
        for fmt in ("<HH", ">HH"):
            needle = struct.pack(fmt, group, element)
            start = data.find(needle)
            while start != -1 and len(found) < 200:
                found.append(start + 4)
                start = data.find(needle, start + 1)
    return sorted(set(found))


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(SEEDS))
    return name, mutate(draw, SEED_BYTES[name])


def mutate(draw, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["tag", "tag", "tag", "pixels", "pixels", "flip",
                                     "overwrite", "cut", "delete", "insert"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "pixels":  # inside the (compressed) pixel data: the codecs' input
            start = max(bytes(data).rfind(b"\xe0\x7f\x10\x00"), 0)
            at = draw(st.integers(start, len(data) - 1))
            value = draw(st.binary(min_size=1, max_size=4))
            data[at:at + len(value)] = value
        elif kind == "tag":
            offsets = tag_offsets(bytes(data))
            if offsets:
                # skip past VR/length or land on them: both are worth breaking
                at = draw(st.sampled_from(offsets)) + draw(st.sampled_from([0, 2, 4, 6, 8]))
            value = draw(st.one_of(st.sampled_from(TELLING), st.binary(min_size=1, max_size=8)))
            data[at:at + len(value)] = value
        elif kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            value = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(value)] = value
        elif kind == "cut":
            del data[at:]
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def run_with_time_limit(data, load=load_dicom):
    """('pictures'|'error'|'other'|'hung', detail). A thread, because a decoder stuck in C
    cannot be interrupted by a signal; a hung one is left behind (daemon) and reported."""
    outcome: list = []

    def target():
        try:
            outcome.append(("pictures", load(data)))
        except InputError as err:
            outcome.append(("error", err))
        except BaseException as err:  # noqa: BLE001 — anything else is the finding
            outcome.append(("other", err))

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(TIME_LIMIT_S)
    return outcome[0] if outcome else ("hung", None)


def _seed_class(name: str) -> str:
    return name.split(":")[0] if name in BUILT else "shipped"


def test_mutated_dicom_ends_in_pictures_or_input_error():
    seen = collections.Counter()
    by_class = collections.defaultdict(collections.Counter)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated())
    def one(case):
        name, data = case
        kind, detail = run_with_time_limit(data)
        seen[kind] += 1
        by_class[_seed_class(name)][kind] += 1
        assert kind != "hung", f"{name}: still running after {TIME_LIMIT_S} s"
        assert kind != "other", f"{name}: raised {type(detail).__name__}: {detail}"
        if kind == "error":
            message = str(detail)
            assert "\n" not in message and " — " in message, message
        else:
            assert detail and all(p.pixels.dtype == np.uint8 and p.pixels.ndim == 3
                                  and p.pixels.shape[2] == 3 for p in detail)

    with memory_headroom():
        one()
    print(f"fuzz outcomes over {sum(seen.values())} inputs: {dict(seen)}; by seed class: "
          f"{ {k: dict(v) for k, v in sorted(by_class.items())} }")
    # Both ends must be exercised, or the mutations are too weak (all decode) or too blunt.
    assert seen["pictures"] >= EXAMPLES // 20 and seen["error"] >= EXAMPLES // 20, dict(seen)


# ---------------------------------------------------------------------------------------------
# Series folders: good slices among hostile entries

FOLDERS = int(os.environ.get("MEDGEMMA_FUZZ_FOLDERS", "150"))
HOSTILE = ["fifo", "dev/zero", "dev/urandom", "dangling link", "no preamble", "cut header",
           "cut pixels", "mutated", "junk", "empty", "png named .dcm"]
SKIPPED_KINDS = {"fifo", "dev/zero", "dev/urandom", "dangling link", "junk", "empty",
                 "png named .dcm"}  # noted on stderr and left out; the rest are slices or errors
WEIRD = "\n\x1b[2J\u202e\x07"  # a newline, a terminal escape, a bidi override, a bell
RAW = set("\x1b\u202e\x07")  # none may reach the terminal as is (newlines: one line each)


@st.composite
def hostile_folder(draw) -> tuple[int, list[tuple[str, bytes | None]], bool]:
    entries = []
    for kind in draw(st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=4)):
        slice_bytes = _slice_bytes(draw(st.integers(10, 19)))
        if kind == "cut header":
            slice_bytes = slice_bytes[:draw(st.integers(133, slice_bytes.index(b"\xe0\x7f") - 1))]
        elif kind == "cut pixels":
            slice_bytes = slice_bytes[:draw(st.integers(slice_bytes.index(b"\xe0\x7f") + 13,
                                                        len(slice_bytes) - 1))]
        elif kind == "mutated":
            slice_bytes = mutate(draw, slice_bytes)
        entries.append((kind, slice_bytes))
    return draw(st.integers(1, 3)), entries, draw(st.booleans())


@functools.lru_cache(maxsize=None)
def _slice_bytes(k: int) -> bytes:
    # Cached: the same bytes every draw (a fresh UID each time would make the draws differ).
    ds = image_dataset(slice_pixels(k), instance=1001 + k)  # same series as write_series'
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.5.{k}"
    out = io.BytesIO()
    save(ds, out)
    return out.getvalue()


def _write_entry(folder: Path, name: str, kind: str, data: bytes) -> None:
    path = folder / name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind.startswith("dev/"):
        os.symlink("/" + kind, path)
    elif kind == "dangling link":
        os.symlink(folder / "nowhere", path)
    elif kind == "no preamble":
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.file_meta, ds.preamble = pydicom.dataset.FileMetaDataset(), None
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:
        path.write_bytes({"junk": b"not DICOM at all\n", "empty": b"",
                          "png named .dcm": _PNG}.get(kind, data))


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (5, 4), (1, 2, 3)).save(out, "PNG")
    return out.getvalue()


_PNG = _png()


def _release_fifos(folder: Path) -> None:
    # A regression that opens a FIFO blocks in open(); a writer coming and going releases it.
    for path in folder.iterdir():
        if path.is_fifo():
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                    reason="FIFOs and /dev/zero are POSIX")
def test_hostile_series_folders_end_in_pictures_or_one_line():
    seen, files = collections.Counter(), collections.Counter()

    @settings(max_examples=FOLDERS, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hostile_folder())
    def one(case):
        good, entries, weird = case
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / (f"series{WEIRD}" if weird else "series")
            write_series(folder, good, shuffle=False)
            files["good slice"] += good
            for i, (kind, data) in enumerate(entries):
                _write_entry(folder, f"x{i}{WEIRD if weird else ''}.dcm", kind, data)
                files[kind] += 1
            notes = io.StringIO()
            with contextlib.redirect_stderr(notes):
                kind, detail = run_with_time_limit(folder, load=load_pictures)
            _release_fifos(folder)
        seen[kind] += 1
        what = f"{good} slices + {[k for k, _ in entries]}"
        assert kind not in ("hung", "other"), f"{what}: {kind} {detail!r}"
        printed = notes.getvalue() + (str(detail) if kind == "error" else "")
        assert not RAW & set(printed), f"{what}: raw control characters: {printed!r}"
        lines = notes.getvalue().splitlines()
        assert all(line.startswith("note: ") and " skipped — " in line for line in lines), lines
        skipped = sum(k in SKIPPED_KINDS for k, _ in entries)
        maybe = sum(k == "mutated" for k, _ in entries)  # may no longer look like DICOM at all
        if kind == "error":
            assert "\n" not in str(detail) and " — " in str(detail), str(detail)
        else:  # every skip said, every slice kept
            assert skipped <= len(lines) <= skipped + maybe, f"{what}: notes {lines}"
            assert len(detail) == good + len(entries) - len(lines), f"{what}: {len(detail)}"

    with memory_headroom():
        one()
    print(f"folder fuzz over {sum(seen.values())} folders, {sum(files.values())} files "
          f"{dict(files)}: {dict(seen)}")
    assert seen["pictures"] >= FOLDERS // 10 and seen["error"] >= FOLDERS // 10, dict(seen)

"""Fuzz: real DICOM bytes from pydicom's test files, mutated; every input must end, within 5 s,
in decoded pictures or the project's own InputError — never another exception, never a hang.

Mutations are byte-level (flip, overwrite, cut, delete, insert), aimed at the pixel data (the
codecs' input), and aimed at tags: the bytes right after the header of a tag the loader relies
on (Rows, BitsAllocated, PhotometricInterpretation, the transfer syntax, the pixel data's
length, ...) are overwritten with random or telling values.
Seeds are small files: the default 2000 examples take ~15 s on two cores; set
MEDGEMMA_FUZZ_EXAMPLES to run more (derandomized, so a CI failure reproduces).
"""

from __future__ import annotations

import collections
import os
import struct
import threading

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from runtime.dicom import load_dicom
from runtime.errors import InputError

SEEDS = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
         "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_implicit.dcm",
         "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_jpeg.dcm", "SC_rgb_rle.dcm",
         "SC_rgb_rle_2frame.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm",
         "JPEG2000.dcm", "JPEGLSNearLossless_08.dcm", "SC_rgb_gdcm_KY.dcm",
         "SC_rgb_jls_lossy_line.dcm", "rtplan.dcm", "reportsi.dcm"]
SEED_BYTES = {name: open(get_testdata_file(name), "rb").read() for name in SEEDS}

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
    data = bytearray(SEED_BYTES[name])
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
    return name, bytes(data)


def run_with_time_limit(data: bytes):
    """('pictures'|'error'|'other'|'hung', detail). A thread, because a decoder stuck in C
    cannot be interrupted by a signal; a hung one is left behind (daemon) and reported."""
    outcome: list = []

    def target():
        try:
            outcome.append(("pictures", load_dicom(data)))
        except InputError as err:
            outcome.append(("error", err))
        except BaseException as err:  # noqa: BLE001 — anything else is the finding
            outcome.append(("other", err))

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(TIME_LIMIT_S)
    return outcome[0] if outcome else ("hung", None)


def test_mutated_dicom_ends_in_pictures_or_input_error():
    seen = collections.Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated())
    def one(case):
        name, data = case
        kind, detail = run_with_time_limit(data)
        seen[kind] += 1
        assert kind != "hung", f"{name}: still running after {TIME_LIMIT_S} s"
        assert kind != "other", f"{name}: raised {type(detail).__name__}: {detail}"
        if kind == "error":
            message = str(detail)
            assert "\n" not in message and " — " in message, message
        else:
            assert detail and all(p.pixels.dtype == np.uint8 and p.pixels.ndim == 3
                                  and p.pixels.shape[2] == 3 for p in detail)

    one()
    print(f"fuzz outcomes over {sum(seen.values())} inputs: {dict(seen)}")
    # Both ends must be exercised, or the mutations are too weak (all decode) or too blunt.
    assert seen["pictures"] >= EXAMPLES // 20 and seen["error"] >= EXAMPLES // 20, dict(seen)

"""Hostile files (issue 12): each is built here, never committed, and must end in one InputError
line, fast, without waiting on it or decoding it.

Anything that could hang or eat memory on a regression runs in a fresh interpreter under an
address-space limit (RLIMIT_AS) and a timeout, so a regression fails this test instead of
exhausting the machine: FIFOs and device links, decompression bombs (deflate, RLE, codestreams
that lie about their size), a sparse file over the size limit, and the no-socket check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medgemma_edge.runtime.dicom import load_dicom
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.files import MAX_FILE_BYTES, shown
from medgemma_edge.runtime.images import MAX_PIXELS, load_image
from medgemma_edge.runtime.sources import load_pictures
from tests.dicom_helpers import (PATIENT_MARKERS, image_dataset, save, shipped, slice_pixels,
                                 write_series)

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 3 << 30  # far above what a refusal needs (~0.2 GB), far below a bomb's GBs
posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                                reason="FIFOs and /dev/zero are POSIX")

PRELUDE = r'''
import json, os, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (int(os.environ["HOSTILE_LIMIT"]),) * 2)
from medgemma_edge.runtime.errors import InputError

def attempt(load, *args, **kwargs):
    start = time.perf_counter()
    try:
        outcome = {"kind": "pictures", "count": len(load(*args, **kwargs))}
    except InputError as err:
        outcome = {"kind": "error", "message": str(err)}
    except BaseException as err:  # the finding: anything but the project's one-line error
        outcome = {"kind": "other", "message": f"{type(err).__name__}: {err}"[:400]}
    outcome["seconds"] = round(time.perf_counter() - start, 3)
    return outcome

def report(**outcomes):
    # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec, so a child of a test run holding models
    # would be charged the parent's gigabytes (runtime/memory.py)
    from medgemma_edge.runtime.memory import peak_rss_mb
    print("RESULT " + json.dumps({"outcomes": outcomes, "peak_rss_mb": peak_rss_mb()}))
'''


def run_limited(body: str, *args, timeout: float = 60) -> tuple[dict, int, str]:
    """(outcomes, peak RSS in MB, stderr) of `body` run in a fresh, memory-limited interpreter."""
    env = dict(os.environ, HOSTILE_LIMIT=str(MEMORY_LIMIT), OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child: rc {proc.returncode}: {proc.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    return result["outcomes"], result["peak_rss_mb"], proc.stderr


def assert_refused(outcome: dict, *fragments: str, within_s: float = 3.0) -> str:
    assert outcome["kind"] == "error", outcome
    message = outcome["message"]
    assert "\n" not in message and " — " in message, f"not one actionable line: {message!r}"
    assert outcome["seconds"] < within_s, outcome
    for fragment in fragments:
        assert fragment in message, message
    assert not any(value in message for value in PATIENT_MARKERS.values()), message
    return message


# --- item 3: anything but a regular file is refused before it is read ------------------------

@posix_only
def test_fifos_and_device_links_are_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    os.mkfifo(tmp_path / "fifo.dcm")
    os.symlink("/dev/zero", tmp_path / "zero.dcm")
    os.symlink("/dev/urandom", tmp_path / "urandom.dcm")  # read on, it grows memory without end
    outcomes, _, _ = run_limited("""
        from medgemma_edge.runtime.dicom import load_dicom
        from medgemma_edge.runtime.images import load_image
        from medgemma_edge.runtime.sources import load_pictures
        folder = sys.argv[1]
        report(**{f"{name} {load.__name__}": attempt(load, os.path.join(folder, name))
                  for name in ("fifo.png", "fifo.dcm", "zero.dcm", "urandom.dcm")
                  for load in (load_pictures, load_image, load_dicom)})
    """, tmp_path, timeout=30)
    assert len(outcomes) == 12
    for what, outcome in outcomes.items():
        kind = "FIFO" if "fifo" in what else "character device"
        assert_refused(outcome, kind, "not a regular file", within_s=1.0)


@posix_only
def test_series_folder_skips_what_is_not_a_regular_file_and_says_so(tmp_path):
    folder = tmp_path / "ct"
    write_series(folder, 4)
    os.mkfifo(folder / "pipe")
    os.symlink("/dev/zero", folder / "zero.dcm")
    os.symlink("/dev/urandom", folder / "random.dcm")
    os.symlink(tmp_path / "gone", folder / "dangling.dcm")
    (folder / "notes\n\x1b[31mred.txt").write_text("not DICOM")
    outcomes, _, stderr = run_limited("""
        from medgemma_edge.runtime.sources import load_pictures
        report(series=attempt(load_pictures, sys.argv[1]))
    """, folder, timeout=30)
    assert outcomes["series"]["kind"] == "pictures" and outcomes["series"]["count"] == 4, outcomes
    notes = [line for line in stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 5 and len(stderr.splitlines()) == 5, stderr
    said = "\n".join(notes)
    for reason in ("pipe: skipped — a FIFO", "zero.dcm: skipped — a character device",
                   "random.dcm: skipped — a character device",
                   "dangling.dcm: skipped — a dangling",
                   "notes\\n\\x1b[31mred.txt: skipped — not a DICOM file"):
        assert reason in said, said
    assert "\x1b" not in stderr


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path):
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)  # sparse: claims 2 GiB, occupies nothing
    outcomes, rss, _ = run_limited("""
        from medgemma_edge.runtime.sources import load_pictures
        report(huge=attempt(load_pictures, sys.argv[1]))
    """, sparse)
    assert_refused(outcomes["huge"], f"over the {MAX_FILE_BYTES:,}-byte limit", within_s=0.5)
    assert rss < 500, f"read the file anyway? peak RSS {rss} MB"


def test_dash_is_not_standard_input():
    for load in (load_pictures, load_image, load_dicom):
        with pytest.raises(InputError, match="standard input is not supported"):
            load("-")


# --- item 4: bombs are bounded from the header before decoding, and inflate is bounded ---------

def test_deflated_bomb_stops_at_the_inflate_bound():
    # ~0.5 MB that inflates to 512 MiB of a 16384² 16-bit frame: refused at the bound
    outcomes, rss, _ = run_limited("""
        from medgemma_edge.runtime.dicom import load_dicom
        from tests.dicom_helpers import deflated_dicom
        data = deflated_dicom(16384, 16384, bits=16)
        report(bomb=attempt(load_dicom, data), size=len(data))
    """)
    assert outcomes["size"] < 1 << 20, outcomes["size"]
    assert_refused(outcomes["bomb"], "inflates to over 512 MiB", "decompression-bomb guard")
    assert rss < 1500, f"peak RSS {rss} MB"


def test_deflated_frame_over_the_pixel_limit_is_refused_from_its_header():
    outcomes, _, _ = run_limited("""
        from medgemma_edge.runtime.dicom import load_dicom
        from medgemma_edge.runtime.sources import load_pictures
        from tests.dicom_helpers import deflated_dicom
        data = deflated_dicom(10000, 10000)  # 100 M pixels, 100 MB inflated: under the bound
        report(dicom=attempt(load_dicom, data), pictures=attempt(load_pictures, data))
    """)
    for outcome in outcomes.values():
        assert_refused(outcome, "10000×10000 frame", f"over the {MAX_PIXELS:,}-pixel limit")


def test_rle_bomb_is_refused_before_decoding():
    # 4 MB of valid RLE that decodes to a 16384² frame (268 M pixels)
    outcomes, rss, _ = run_limited("""
        from medgemma_edge.runtime.dicom import load_dicom
        from tests.dicom_helpers import rle_dicom
        data = rle_dicom(16384, 16384)
        report(bomb=attempt(load_dicom, data), size=len(data))
    """)
    assert outcomes["size"] < 5 << 20, outcomes["size"]
    assert_refused(outcomes["bomb"], "16384×16384 frame", f"{MAX_PIXELS:,}-pixel limit")
    assert rss < 500, f"decoded anyway? peak RSS {rss} MB"


def test_many_frames_over_the_series_limit_are_refused_before_decoding():
    # 30 frames of 4096² (8 MB of RLE): each under the frame limit, 503 M pixels together
    outcomes, rss, _ = run_limited("""
        from medgemma_edge.runtime.dicom import load_dicom
        from tests.dicom_helpers import rle_dicom
        report(frames=attempt(load_dicom, rle_dicom(4096, 4096, frames=30)))
    """)
    assert_refused(outcomes["frames"], "the 30 slices kept hold 503,316,480 pixels",
                   "--max-slices 21")
    assert rss < 500, f"decoded anyway? peak RSS {rss} MB"


def test_series_folder_over_the_total_limit_is_refused_from_headers(tmp_path):
    # 86 files whose headers say 2100² each (85 kept: 375 M pixels); their data is a few bytes
    folder = tmp_path / "wide"
    folder.mkdir()
    for k in range(86):
        ds = image_dataset(slice_pixels(k), instance=k + 1)
        ds.Rows = ds.Columns = 2100
        save(ds, folder / f"{k:03d}.dcm")
    said = r"85 slices kept hold 374,850,000 pixels.*--max-slices 81"
    with pytest.raises(InputError, match=said):
        load_dicom(folder)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm",
                                  "MR_small_jp2klossless.dcm"])
def test_codestream_claiming_a_bigger_frame_is_refused_before_decoding(name):
    # Rows/Columns say 64×64, the codestream 60000×60000: libjpeg took ~3 GB and up to 54 s
    outcomes, rss, _ = run_limited("""
        from medgemma_edge.runtime.dicom import load_dicom
        from tests.dicom_helpers import codestream_liar
        report(liar=attempt(load_dicom, codestream_liar(sys.argv[1])))
    """, name)
    assert_refused(outcomes["liar"], "the compressed frame declares 60000×60000", within_s=1.0)
    assert rss < 500, f"decoded anyway? peak RSS {rss} MB"


def test_memory_error_while_decoding_is_one_line(monkeypatch, tmp_path):
    from medgemma_edge.runtime import images
    from medgemma_edge.runtime.dicom import frames

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(frames, "pixel_array", exhausted)
    with pytest.raises(InputError, match="not enough memory") as caught:
        load_dicom(shipped("CT_small.dcm"))
    assert "\n" not in str(caught.value) and caught.value.__suppress_context__
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    monkeypatch.setattr(images, "_from_pil", exhausted)
    with pytest.raises(InputError, match="not enough memory"):
        load_pictures(tmp_path / "p.png")


# --- item 8: content decides, cut headers say truncated, names are printed escaped ------------

def test_content_decides_not_the_file_name(tmp_path):
    rgb = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
    Image.fromarray(rgb).save(tmp_path / "scan.dcm", "PNG")
    assert np.array_equal(load_pictures(tmp_path / "scan.dcm")[0].pixels, rgb)
    (tmp_path / "xray.png").write_bytes(Path(shipped("CT_small.dcm")).read_bytes())
    want = load_dicom(shipped("CT_small.dcm"))[0].pixels
    assert np.array_equal(load_pictures(tmp_path / "xray.png")[0].pixels, want)
    ds = pydicom.dcmread(shipped("MR_small.dcm"))  # no preamble, no meta: found by content
    ds.file_meta, ds.preamble = pydicom.dataset.FileMetaDataset(), None
    ds.save_as(tmp_path / "bare", implicit_vr=True, little_endian=True, enforce_file_format=False)
    bare = (tmp_path / "bare").read_bytes()
    want = load_dicom(shipped("MR_small.dcm"))[0].pixels
    for src in (tmp_path / "bare", bare):
        assert np.array_equal(load_pictures(src)[0].pixels, want)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_a_header_cut_anywhere_says_truncated(name):
    data = Path(shipped(name)).read_bytes()
    pixels = pydicom.dcmread(shipped(name)).get_item(0x7FE00010).value_tell
    said = {}
    for cut in range(132, pixels, 3):  # every third byte after "DICM": meta and header
        with pytest.raises(InputError) as caught:
            load_dicom(data[:cut])
        said.setdefault("truncated" in str(caught.value), []).append(cut)
    assert False not in said, f"cut at {said[False][:5]}: not called truncated"


def test_names_with_control_characters_are_printed_escaped(tmp_path):
    folder = tmp_path / "in\nbox"
    write_series(folder, 2)
    evil = folder / "slice\x1b]0;owned\x07\u202e.dcm"
    evil.write_bytes(Path(shipped("CT_small.dcm")).read_bytes()[:1000])  # a cut header
    with pytest.raises(InputError) as caught:
        load_pictures(folder)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message and "\u202e" not in message, message
    assert "in\\nbox/slice\\x1b]0;owned\\x07\\u202e.dcm: the file is truncated" in message
    assert shown("a\\b\tc\udcff") == "a\\\\b\\tc\\udcff"  # a backslash stays distinct


# --- item 9: no socket, not even the IPv6 probe of urllib3's import ------------------------------

def test_loading_dicom_and_png_opens_no_socket(tmp_path):
    Image.new("RGB", (16, 16), (9, 99, 199)).save(tmp_path / "p.png")
    code = textwrap.dedent("""
        import json, socket, sys
        made = []
        class NoSocket(socket.socket):
            def __init__(self, *args, **kwargs):
                made.append(args)
                raise OSError("the runtime opened a socket")
        def refuse(*args, **kwargs):
            made.append(args)
            raise OSError("the runtime reached for the network")
        socket.socket = NoSocket
        socket.socketpair = socket.create_connection = refuse
        from medgemma_edge.runtime.sources import load_pictures  # noqa: E402
        counts = [len(load_pictures(path)) for path in sys.argv[1:]]
        loaded = {name: name in sys.modules for name in ("requests", "urllib3", "pydicom")}
        print(json.dumps({"made": len(made), "counts": counts, **loaded}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.png"),
                           shipped("CT_small.dcm"), shipped("MR_small_RLE.dcm")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"made": 0, "counts": [1, 1, 1], "requests": False, "urllib3": False,
                    "pydicom": True}, seen


@pytest.mark.parametrize("module", ["read", "frames", "series", "convert"])
def test_each_dicom_module_imports_pydicom_without_requests(module):
    code = (f"import sys, medgemma_edge.runtime.dicom.{module}; "
            "assert 'pydicom' in sys.modules and 'requests' not in sys.modules, 'requests'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

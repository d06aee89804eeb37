"""No patient-identifying value leaves load_dicom: not in an error, a warning, a log record, or
anything printed — even with pydicom's debug logging switched on, which dumps element values."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pydicom
import pytest

from medgemma_edge.runtime.dicom import load_dicom
from medgemma_edge.runtime.errors import InputError
from pydicom.data import get_testdata_file

from tests.dicom_helpers import PATIENT_MARKERS, image_dataset, save, with_patient

MARKERS = list(PATIENT_MARKERS.values()) + ["Quokka", "QZX"]


def write_case(tmp_path, case: str):
    if case == "broken_codestream":  # decoder plugins log their failures
        ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
        with_patient(ds)
        path = tmp_path / "j2k.dcm"
        ds.save_as(path)
        data = bytearray(path.read_bytes())
        soc = data.index(b"\xff\x4f\xff\x51")  # J2K start of codestream + image size marker
        data[soc + 4:soc + 44] = b"\xff" * 40
        path.write_bytes(bytes(data))
        return path
    ds = image_dataset(np.arange(64, dtype=np.int16).reshape(8, 8))
    ds.PatientWeight = "12345678"  # replaced below by text that is not a number
    if case == "photometric":
        ds.PhotometricInterpretation = "HSV"
    elif case == "no_pixels":
        del ds.PixelData
    elif case == "short_pixels":
        ds.PixelData = ds.PixelData[:50]
    elif case == "transfer_syntax":
        ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    elif case == "bad_frames":
        ds.NumberOfFrames = "100000000001"
    path = save(ds, tmp_path / f"{case}.dcm")
    data = path.read_bytes().replace(b"12345678", b"QZXWEIGH")
    data = data.replace(b"100000000001", b"QZXFRAMES001")
    if case == "cut_in_header":  # ends inside the patient's name
        data = data[:data.index(b"Quokka") + 3]
    path.write_bytes(data)
    return path


def leaks(text: str) -> list[str]:
    return [m for m in MARKERS if m in text]


@pytest.fixture
def pydicom_debug():
    logger = logging.getLogger("pydicom")
    level = logger.level
    pydicom.config.debug(True, default_handler=False)
    yield
    pydicom.config.debug(False, default_handler=False)
    logger.setLevel(level)


def test_control_pydicom_debug_logging_does_dump_patient_values(tmp_path, caplog, pydicom_debug):
    # Proves the harness below can see a leak: plain pydicom with debug on logs the name.
    path = write_case(tmp_path, "valid")
    with caplog.at_level(logging.DEBUG):
        pydicom.dcmread(path)
    assert leaks(caplog.text), "control failed: pydicom did not log the patient's name"


@pytest.mark.parametrize("case", ["valid", "photometric", "no_pixels", "short_pixels",
                                  "transfer_syntax", "bad_frames", "cut_in_header",
                                  "broken_codestream"])
def test_nothing_identifying_escapes(tmp_path, caplog, capfd, pydicom_debug, case):
    path = write_case(tmp_path, case)
    caplog.clear()  # writing the case read files with pydicom's debug log on
    message = ""
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            pictures = load_dicom(path)
            assert case == "valid" and len(pictures) == 1
        except InputError as err:
            assert case != "valid", f"valid file refused: {err}"
            message = str(err)
    out, err_text = capfd.readouterr()
    channels = {"message": message, "log": caplog.text, "stdout": out, "stderr": err_text,
                "warnings": "\n".join(str(w.message) for w in seen)}
    found = {name: leaks(text) for name, text in channels.items() if leaks(text)}
    assert not found, f"{case}: identifying values escaped through {found}"
    # Stricter than the markers: pydicom and its plugins say nothing at all while we read.
    chatter = [f"{r.name}: {r.getMessage()}" for r in caplog.records
               if r.name.split(".")[0] in ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle")]
    assert not chatter, f"{case}: decoder libraries logged {chatter[:3]}"
    # pydicom's logger is back to normal afterwards.
    assert not logging.getLogger("pydicom").disabled


def test_quiet_pydicom_holds_across_overlapping_threads():
    """The node reads headers on several threads: one reader leaving must not unsilence another
    still inside, and the last one out restores the filters as they were (no lasting 'ignore')."""
    import threading
    import warnings

    from medgemma_edge.runtime.dicom.read import quiet_pydicom

    before = warnings.filters[:]
    inside, leave_a, leave_b = threading.Event(), threading.Event(), threading.Event()
    caught = []

    def a():
        with quiet_pydicom():
            inside.set()
            leave_a.wait(10)

    def b():
        inside.wait(10)
        with quiet_pydicom():
            leave_a.set()
            thread_a.join(10)  # A has left; B is still inside
            with warnings.catch_warnings(record=True) as seen:
                warnings.warn("PHI^CANARY in a pydicom warning")
            caught.extend(seen)
            leave_b.set()

    thread_a, thread_b = threading.Thread(target=a), threading.Thread(target=b)
    thread_a.start(), thread_b.start()
    thread_b.join(20)
    assert leave_b.is_set() and not thread_b.is_alive()
    assert not caught, "a warning escaped a reader that was still inside quiet_pydicom"
    assert warnings.filters == before, "the filters were not restored"
    with warnings.catch_warnings(record=True) as seen:  # and outside, warnings are heard again
        warnings.simplefilter("always")
        warnings.warn("heard")
    assert seen

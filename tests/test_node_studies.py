"""The node's book of studies (node/studies.py): states as instances arrive and go quiet, which
series the model reads (and why not), the worklist with patient values only when authenticated,
and the one chat a study is prepared and asked with. Instances are real files in a real spool."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydicom.uid import generate_uid

from medgemma_edge.node.spool import Spool
from medgemma_edge.node.studies import StudyBook, classify, study_messages
from medgemma_edge.runtime.presets import card_system
from tests.dicom_helpers import PATIENT_MARKERS, image_dataset, slice_pixels

STUDY = "1.2.826.0.1.3680043.8.498.1"  # image_dataset's study


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _bytes(ds) -> bytes:
    import io

    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return out.getvalue()


def _instance(spool, k=0, *, series="1.2.3.1", number=7, sop_class=None, modality="CT", image_type=None,
              description=None, study=None):
    ds = image_dataset(slice_pixels(k), modality=modality, series_uid=series, instance=k + 1)
    ds.SeriesNumber = number
    if study is not None:
        ds.StudyInstanceUID = study
    if sop_class is not None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    if image_type is not None:
        ds.ImageType = image_type
    if description is not None:
        ds.SeriesDescription = description
    ds.StudyDescription = "CT HEAD Quokka special"
    ds.StudyDate = "20240102"
    return spool.put(_bytes(ds))


@pytest.fixture
def spool(tmp_path):
    return Spool(tmp_path / "spool", 1 << 30)


def test_a_study_is_queued_once_quiet_and_a_resend_changes_nothing(spool):
    clock = Clock()
    book = StudyBook(stable_s=10.0, clock=clock)
    first = _instance(spool, 0)
    assert book.add(first) and book.study(STUDY).state == "receiving"
    clock.now += 9.0
    assert book.add(_instance(spool, 1))
    clock.now += 9.0
    assert book.due() == []  # 9 s since the last instance: still receiving
    clock.now += 1.0
    assert book.due() == [STUDY] and book.study(STUDY).state == "queued"
    assert book.due() == []  # queued once
    assert not book.add(first), "the same instance again is no news"
    assert book.study(STUDY).state == "queued"
    book.set_state(STUDY, "preparing", done=1, total=4)
    assert book.study(STUDY).describe_state() == "preparing 1 of 4"
    book.set_state(STUDY, "ready")
    assert book.add(_instance(spool, 2)) and book.study(STUDY).state == "receiving", "a late instance: again"
    book.set_state(STUDY, "ready")  # a preparation that started before it does not mark it ready
    assert book.study(STUDY).state == "receiving"
    assert len(book.study(STUDY).instances) == 3


def test_failed_says_why_in_one_line(spool):
    book = StudyBook(stable_s=0.0)
    book.add(_instance(spool, 0))
    book.due()
    book.set_state(STUDY, "failed", why="IM1: the pixel data is cut short")
    row = book.worklist(auth=False)[0]
    assert row["state"] == "failed" and row["status"] == "failed: IM1: the pixel data is cut short"
    with pytest.raises(ValueError):
        book.set_state(STUDY, "done")


@pytest.mark.parametrize("what,kwargs,reason", [
    ("a CT slice", {}, None),
    ("an RT image (a radiograph)", {"sop_class": "1.2.840.10008.5.1.4.1.1.481.1", "modality": "RTIMAGE"}, None),
    ("a VL photograph", {"sop_class": "1.2.840.10008.5.1.4.1.1.77.1.4", "modality": "XC"}, None),
    ("a comprehensive SR", {"sop_class": "1.2.840.10008.5.1.4.1.1.88.33", "modality": "SR"}, "structured report"),
    ("a dose SR (modality not SR)", {"sop_class": "1.2.840.10008.5.1.4.1.1.88.67", "modality": "CT"}, "dose report"),
    ("a key object", {"sop_class": "1.2.840.10008.5.1.4.1.1.88.59", "modality": "OT"}, "key object"),
    ("a presentation state", {"sop_class": "1.2.840.10008.5.1.4.1.1.11.1", "modality": "OT"}, "presentation state"),
    ("raw data", {"sop_class": "1.2.840.10008.5.1.4.1.1.66", "modality": "OT"}, "raw data"),
    ("a localizer", {"image_type": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer"),
    ("a dose screen", {"sop_class": "1.2.840.10008.5.1.4.1.1.7", "modality": "CT", "description": "Dose Report"},
     "dose report screen"),
])
def test_classify_says_why_a_series_is_skipped(spool, what, kwargs, reason):
    book = StudyBook(stable_s=0.0)
    book.add(_instance(spool, 0, **kwargs))
    series = book.study(STUDY).series[0]
    got = classify(series)
    print(f"{what}: {got}")
    if reason is None:
        assert got is None
    else:
        assert got and reason in got and "\n" not in got and "Quokka" not in got


def test_a_volume_with_a_localizer_is_read_and_the_localizer_dropped_by_the_loader(spool):
    book = StudyBook(stable_s=0.0)
    book.add(_instance(spool, 0, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    for k in (1, 2):
        book.add(_instance(spool, k, image_type=["ORIGINAL", "PRIMARY", "AXIAL"]))
    assert classify(book.study(STUDY).series[0]) is None


def test_worklist_shows_patient_values_only_when_authenticated(spool):
    book = StudyBook(stable_s=0.0)
    book.add(_instance(spool, 0))
    book.add(_instance(spool, 0, series="1.2.3.9", number=9, sop_class="1.2.840.10008.5.1.4.1.1.88.33",
                       modality="SR"))
    open_rows = book.worklist(auth=False)
    text = json.dumps(open_rows)
    for marker in PATIENT_MARKERS.values():
        assert marker not in text, marker
    assert "Quokka" not in text and "20240102" not in text
    row = open_rows[0]
    assert row["uid"] == STUDY and row["instances"] == 2 and row["modalities"] == ["CT", "SR"]
    assert [s["readable"] for s in row["series"]] == [True, False]
    assert "structured report" in row["series"][1]["skipped"]
    assert row["url"] == f"medgemma-edge:study/{STUDY}" and row["preview"].endswith("/preview.png")
    keyed = book.worklist(auth=True)[0]
    print({k: keyed[k] for k in ("patient_name", "patient_id", "accession", "study_date", "study_description")})
    assert keyed["patient_name"] == PATIENT_MARKERS["PatientName"]
    assert keyed["patient_id"] == PATIENT_MARKERS["PatientID"]
    assert keyed["accession"] == PATIENT_MARKERS["AccessionNumber"]
    assert keyed["study_date"] == "20240102" and keyed["study_description"] == "CT HEAD Quokka special"


def test_study_messages_are_the_default_system_and_one_item_per_readable_series(spool):
    book = StudyBook(stable_s=0.0)
    for series, number in (("1.2.3.20", 20), ("1.2.3.5", 5), ("1.2.3.6", None)):
        for k in (0, 1):
            book.add(_instance(spool, k + 10 * (number or 1), series=series, number=number or 0))
    book.add(_instance(spool, 0, series="1.2.3.99", number=1, sop_class="1.2.840.10008.5.1.4.1.1.88.22",
                       modality="SR"))
    study = book.study(STUDY)
    book.classify(study)
    messages = study_messages(study, "Any bleed?")
    assert messages[0] == {"role": "system", "content": card_system(True)}
    items = messages[1]["content"]
    assert items[-1] == {"type": "text", "text": "Any bleed?"}
    want = [s for s in ("1.2.3.6", "1.2.3.5", "1.2.3.20")]  # SeriesNumber order (0, 5, 20); the SR left out
    got = [study.series[[s.uid for s in study.series].index(uid)].paths() for uid in want]
    assert [i["image"] for i in items[:-1]] == got
    assert all(isinstance(p, str) and len(i["image"]) == 2 for i in items[:-1] for p in i["image"])
    assert study_messages(study)[1]["content"] == items[:-1]  # no question: the prefix alone


def test_two_studies_are_listed_in_arrival_order(spool):
    book = StudyBook(stable_s=0.0)
    other = generate_uid()
    book.add(_instance(spool, 0))
    book.add(_instance(spool, 1, study=other, series="1.2.3.77"))
    assert [row["uid"] for row in book.worklist(auth=False)] == [STUDY, other]
    book.remove(STUDY)
    assert [row["uid"] for row in book.worklist(auth=False)] == [other]
    assert np.all([book.add(i) for i in spool.instances(STUDY)]), "a removed study's instances are new again"

"""What arrived and where its preparation stands: the node's book of studies and its worklist.

A study is `receiving` while instances arrive; quiet for `stable_s` it is `queued` (node/prepare.py
takes it from there: `preparing` i of n, then `ready`, or `failed` with one line). An instance of
a study that was queued or done sends it back to `receiving` (a late series is prepared with the
rest); an instance received again (same SOP instance UID: a resend after a restart) changes
nothing. Each series is classified once, from one header read through the runtime's DICOM gate
(runtime/dicom/read.py): the model reads images, so reports, dose screens, localizers, display
states and other non-image objects are skipped, each with a one-line reason the worklist shows.

Patient values (name, ID, accession, study date and description) are read only for a worklist
that an authenticated client asked for, kept in memory, and never logged or put in an error.

`study_messages` is the one chat the node prepares and the server answers about a study: the
default system prompt for images (runtime.presets.card_system: the one rule `ask` and the server use),
then one user turn with one image item per readable series (SeriesNumber order, then UID), each
the list of that series' files (a whole slide: its first instance, which the slide path opens with
its other levels: the sampled tissue patches, docs/wsi.md). The question, when there is one, follows the images, so the
saved prefix (everything up to the end of the last image) is the same for every question.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from medgemma_edge.runtime.presets import card_system

STUDY, SERIES = "medgemma-edge:study/", "medgemma-edge:series/"  # how a chat names them
STATES = ("receiving", "queued", "preparing", "ready", "failed")
WSI_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
# Storage classes that hold no picture the model reads (PS3.4 B.5): a class UID, or a family of
# them (the UID and everything under it), with why; the first match wins.
_NOT_IMAGES = (
    ("1.2.840.10008.5.1.4.1.1.88.67", "a radiation dose report (structured, no image)"),
    ("1.2.840.10008.5.1.4.1.1.88.68", "a radiopharmaceutical dose report (structured, no image)"),
    ("1.2.840.10008.5.1.4.1.1.88.73", "a patient radiation dose report (structured, no image)"),
    ("1.2.840.10008.5.1.4.1.1.88.59", "a key object selection (a note pointing at images)"),
    ("1.2.840.10008.5.1.4.1.1.88", "a structured report (text, no image)"),
    ("1.2.840.10008.5.1.4.1.1.11", "a presentation state (display settings, no pixels)"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "a segmentation mask"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data, a registration or a surface (no image)"),
    ("1.2.840.10008.5.1.4.1.1.9", "a waveform (ECG, audio), no image"),
    ("1.2.840.10008.5.1.4.1.1.104", "an encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.481.1", None),  # RT Image: a radiograph
    ("1.2.840.10008.5.1.4.1.1.481.2", "an RT dose grid"),
    ("1.2.840.10008.5.1.4.1.1.481", "a radiotherapy plan, record or structure set (no image)"),
    ("1.2.840.10008.5.1.4.1.1.4.2", "MR spectroscopy (no image)"),
)
_NOT_IMAGES_BY_MODALITY = {
    "SR": "a structured report (text, no image)", "KO": "a key object selection (a note pointing at images)",
    "PR": "a presentation state (display settings, no pixels)", "SEG": "a segmentation mask",
    "RTDOSE": "an RT dose grid", "RTSTRUCT": "a radiotherapy structure set (no image)",
    "RTPLAN": "a radiotherapy plan (no image)", "REG": "a registration (no image)",
    "DOC": "an encapsulated document", "ECG": "a waveform (ECG), no image",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Header values read for the worklist of an authenticated client (never for anything else).
_WORKLIST_TAGS = ("PatientName", "PatientID", "AccessionNumber", "StudyDate", "StudyDescription")


@dataclass
class Series:
    uid: str
    modality: str | None
    number: int | None
    instances: list = field(default_factory=list)  # node.spool.Instance, in arrival order
    skipped: str | None = None  # why the model does not read it (classify); None: readable
    classified: bool = False

    @property
    def readable(self) -> bool:
        return self.skipped is None

    def paths(self) -> list[str]:
        return [str(inst.path) for inst in self.instances]

    @property
    def is_slide(self) -> bool:
        """A whole-slide microscopy series: its instances are the levels of one tiled pyramid."""
        return bool(self.instances) and str(getattr(self.instances[0], "sop_class", "")) == WSI_CLASS

    def source(self) -> str | list[str]:
        """What the runtime reads: a slide's first instance (OpenSlide finds the other levels in
        the study's spool folder, runtime/wsi), else the list of the series' files."""
        return self.paths()[0] if self.is_slide else self.paths()


@dataclass
class Study:
    uid: str
    series: list[Series] = field(default_factory=list)
    state: str = "receiving"
    done: int | None = None  # "preparing done of total"
    total: int | None = None
    why: str | None = None  # the one line of a failed study
    last: float = 0.0  # clock time of its last new instance
    received: float = 0.0  # wall time of its first instance (worklist order)
    worklist_values: dict | None = None  # patient values, read for an authenticated worklist only

    @property
    def instances(self) -> list:
        return [inst for s in self.series for inst in s.instances]

    def readable_series(self) -> list[Series]:
        return sorted((s for s in self.series if s.readable),
                      key=lambda s: (s.number is None, s.number if s.number is not None else 0, s.uid))

    def find_series(self, uid: str) -> Series | None:
        return next((s for s in self.series if s.uid == uid), None)

    def describe_state(self) -> str:
        if self.state == "preparing" and self.total:
            return f"preparing {self.done or 0} of {self.total}"
        if self.state == "failed":
            return f"failed: {self.why}"
        return self.state


class StudyBook:
    """Thread-safe: the DIMSE listener adds, the node's timer moves studies on, routes read."""

    def __init__(self, stable_s: float, clock=time.monotonic):
        self.stable_s, self.clock = stable_s, clock
        self._studies: dict[str, Study] = {}
        self._sops: dict[str, str] = {}  # SOP instance UID → sha256 of the stored bytes
        self._lock = threading.Lock()

    def add(self, inst) -> bool:
        """Note a stored instance; False when it was known already (a resend changes nothing; new
        bytes under a known SOP UID replace the old ones in the spool, and here)."""
        with self._lock:
            known = self._sops.get(inst.sop_uid)
            if known == inst.sha256:
                return False
            self._sops[inst.sop_uid] = inst.sha256
            study = self._studies.get(inst.study_uid)
            if study is None:
                study = self._studies[inst.study_uid] = Study(inst.study_uid, received=inst.received)
            series = study.find_series(inst.series_uid)
            if series is None:
                series = Series(inst.series_uid, inst.modality, inst.series_number)
                study.series.append(series)
            for other in study.series if known is not None else ():
                other.instances = [i for i in other.instances if i.sop_uid != inst.sop_uid]
            series.instances.append(inst)
            series.classified = False  # a new instance may change what the series is
            study.state, study.done, study.total, study.why = "receiving", None, None, None
            study.last = self.clock()
            return True

    def due(self, not_before: float | None = None) -> list[str]:
        """Studies quiet for stable_s and still receiving, now `queued` (oldest first). The quiet
        time counts from `not_before` when that is later (the node's model became ready: a sender
        resending after a restart has had no chance before)."""
        now = self.clock()
        with self._lock:
            ready = [s for s in self._studies.values()
                     if s.state == "receiving" and now - max(s.last, not_before or s.last) >= self.stable_s]
            for study in ready:
                study.state = "queued"
            return [s.uid for s in sorted(ready, key=lambda s: s.last)]

    def settle(self, study_uid: str) -> None:
        """A study known to be whole (pulled from DICOMweb): queued now, without waiting."""
        with self._lock:
            study = self._studies.get(study_uid)
            if study is not None and study.state == "receiving":
                study.state = "queued"

    def set_state(self, study_uid: str, state: str, done=None, total=None, why=None) -> None:
        if state not in STATES:
            raise ValueError(f"unknown study state {state!r}")
        with self._lock:
            study = self._studies.get(study_uid)
            if study is None or (study.state == "receiving" and state != "receiving"):
                return  # new instances arrived meanwhile: the study waits for quiet again
            study.state, study.done, study.total, study.why = state, done, total, why

    def study(self, uid: str) -> Study | None:
        with self._lock:
            return self._studies.get(uid)

    def studies(self) -> list[Study]:
        with self._lock:
            return sorted(self._studies.values(), key=lambda s: s.received)

    def remove(self, uid: str) -> None:
        """Forget a study (its spool files were pruned)."""
        with self._lock:
            study = self._studies.pop(uid, None)
            for inst in study.instances if study else ():
                self._sops.pop(inst.sop_uid, None)

    def classify(self, study: Study) -> None:
        """Classify the series of `study` not classified yet (one header read each)."""
        for series in list(study.series):
            if not series.classified:
                series.skipped, series.classified = classify(series), True

    def worklist(self, auth: bool) -> list[dict]:
        out = []
        for study in self.studies():
            self.classify(study)
            out.append(study_entry(study, auth))
        return out


def classify(series: Series) -> str | None:
    """Why the model does not read `series` (one line, no value from the file), or None."""
    from medgemma_edge.runtime.dicom.read import Source, quiet_pydicom, read, tag

    reason = _NOT_IMAGES_BY_MODALITY.get((series.modality or "").upper())
    if reason is not None:
        return reason
    sop_class = str(getattr(series.instances[0], "sop_class", "") or "")
    for family, why in _NOT_IMAGES:
        if _in_family(sop_class, family):
            if why is None:
                break
            return why
    for inst in series.instances:  # localizers only: skipped; mixed in a volume: the loader drops them
        source = Source(name="a spooled instance", path=inst.path)
        try:
            with quiet_pydicom():
                ds = read(source, header_only=True)
        except Exception:
            return None  # unreadable here: the decode says why, in one line, when it is prepared
        image_type = str(tag(ds, "ImageType", source, str, "", strict=False)).upper()
        if "LOCALIZER" not in image_type:
            if _in_family(sop_class, _SECONDARY_CAPTURE) and _is_dose_screen(ds, source, image_type):
                return "a dose report screen (a picture of numbers, not anatomy)"
            return None
    return "localizer (scout) images only"


def _in_family(uid: str, family: str) -> bool:
    """`uid` is the class `family` or one under it (1.2.3 holds 1.2.3 and 1.2.3.4, not 1.2.34)."""
    return uid == family or uid.startswith(family + ".")


def _is_dose_screen(ds, source, image_type: str) -> bool:
    """A scanner's dose page saved as a secondary capture: named so in its type or description
    (read here, never shown)."""
    from medgemma_edge.runtime.dicom.read import tag

    description = str(tag(ds, "SeriesDescription", source, str, "", strict=False)).upper()
    return "DOSE" in description or "DOSE" in image_type


def study_entry(study: Study, auth: bool) -> dict:
    """One worklist row; patient values only when `auth`."""
    readable = study.readable_series()
    entry = {
        "uid": study.uid,
        "state": study.state,
        "status": study.describe_state(),
        "progress": {"done": study.done or 0, "total": study.total} if study.state == "preparing" else None,
        "why": study.why,
        "modalities": sorted({s.modality for s in study.series if s.modality}),
        "instances": sum(len(s.instances) for s in study.series),
        "readable_series": len(readable),
        "url": STUDY + study.uid,
        "preview": f"/v1/studies/{study.uid}/preview.png",
        "series": [{"uid": s.uid, "modality": s.modality, "number": s.number, "instances": len(s.instances),
                    "readable": s.readable, "skipped": s.skipped} for s in
                   sorted(study.series, key=lambda s: (s.number is None, s.number or 0, s.uid))],
    }
    if auth:
        entry.update(worklist_values(study))
    return entry


def worklist_values(study: Study) -> dict:
    """Name, ID, accession, date, description of `study`, read once from one of its headers."""
    if study.worklist_values is None:
        from medgemma_edge.runtime.dicom.read import Source, quiet_pydicom, read, tag

        values = dict.fromkeys(("patient_name", "patient_id", "accession", "study_date", "study_description"))
        instances = study.instances
        if instances:
            source = Source(name="a spooled instance", path=instances[0].path)
            try:
                with quiet_pydicom():
                    ds = read(source, header_only=True)
                for key, keyword in zip(values, _WORKLIST_TAGS):
                    values[key] = tag(ds, keyword, source, _text, None, strict=False)
            except Exception:
                pass  # a header that cannot be read shows no values; its series say why when prepared
        study.worklist_values = values
    return dict(study.worklist_values)


def _text(value) -> str:
    return str(value).strip()[:128]


def study_messages(study: Study, question: str | None = None) -> list[dict]:
    """The chat the node prepares for `study` (module docstring); `question` appended if given."""
    content = [{"type": "image", "image": s.source()} for s in study.readable_series()]
    if question is not None:
        content.append({"type": "text", "text": question})
    return [{"role": "system", "content": card_system(True)}, {"role": "user", "content": content}]

"""A model's answer as a DICOM Structured Report: the draft that goes back into the PACS.

What the draft is, and why:
- **Comprehensive SR** (highdicom `ComprehensiveSR`). Every PACS takes it (it is in the default
  storage SOP classes of Orthanc, dcm4chee and the vendor archives since DICOM 2000), dcmtk's
  `dsrdump` checks it against the IOD's content rules, and it allows everything the draft holds
  (TEXT inferred from IMAGE, text modifiers). Enhanced SR would do too, but gains nothing here;
  IHE AIR's Comprehensive 3D SR only adds 3D coordinates, which a text answer has none of, and
  older archives do not all list it.
- **Same study, new series.** Patient and study modules are copied from the header of one
  referenced instance (highdicom copies them from the first evidence item), so the draft files under
  the patient's study; a new SeriesInstanceUID per draft, Modality SR, a SeriesDescription that says
  it is an unverified AI draft, not for diagnosis. VerificationFlag UNVERIFIED (nobody signed it),
  CompletionFlag COMPLETE (the answer is whole), PreliminaryFlag PRELIMINARY (it is a draft).
- **Content: TID 2000 (Basic Diagnostic Imaging Report)**, the template for narrative reports:
  a "Request" section holding the question, a "Findings" section holding the answer as one TEXT
  "Finding", inferred from IMAGE items that name the referenced instances.
- **References**: every instance in `references`, deduplicated, in the order given, both as IMAGE
  items and in the Current Requested Procedure Evidence Sequence (where a PACS looks for what a
  report is about). The node passes the instances of the series the answer was about — for a large
  CT every instance of the series, not only the slices the model saw (the answer speaks for the
  series; the slice choice is the runtime's business and changes with --max-slices). Only the first
  reference's file is read (its header, for the patient and study modules); the others need only
  the UIDs the spool already holds.

IHE AI Results (AIR), followed where it is simple: the result is an SR in the source study with
its own series; the General Equipment module names the AI (Manufacturer medgemma-edge,
ManufacturerModelName = the model, SoftwareVersions = the runtime version); the observer context is
a device (TID 1001/1004: observer type Device, a device UID stable per model bundle and runtime
version, its name, manufacturer and model); the finding carries TID 4019 Algorithm Identification
(name = the model, version = the bundle's sha256, which pins the exact weights and quantization,
manufacturer medgemma-edge, one parameter naming the runtime version); the source images are
referenced. Not followed: AIR encodes results as TID 1500 measurement reports of coded
qualitative findings, measurements and regions in Comprehensive 3D SR; a free-text answer has no
codes, measurements or coordinates, so TID 2000's narrative sections carry it instead; no Image
Library (TID 1600), no tracking identifiers, no Language of Content (the model answers in the
question's language, which the node does not detect).

No value from the header reaches a message: errors name the library's exception type only.
"""

from __future__ import annotations

from pathlib import Path

from medgemma_edge.runtime.dicom import offline  # noqa: F401 — before pydicom (see offline.py)

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from medgemma_edge.runtime.dicom.read import Source, quiet_pydicom, read
from medgemma_edge.runtime.errors import InputError

MANUFACTURER = "medgemma-edge"
# LO is at most 64 characters; PACS viewers show it in the series list, so it leads with the warning.
SERIES_DESCRIPTION = "UNVERIFIED AI DRAFT - not for diagnosis (medgemma-edge)"
# A series number far from the modality's own (small numbers, and thousands for reformats), so the draft
# sorts after the images in a viewer's series list.
SERIES_NUMBER = 9901
# highdicom reads these from the first evidence item as attributes; absent ones are Type 2 in the
# SR (present, maybe empty), so they are filled with empty values, never invented.
_TYPE2_FROM_EVIDENCE = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                        "AccessionNumber", "StudyID", "StudyDate", "StudyTime")
_SEXES = {"M", "F", "O"}
_DATES = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}


def draft_sr(question: str, answer: str, *, references: list, model_name: str, bundle_sha256: str,
             software_version: str) -> Dataset:
    """The answer as an unverified Comprehensive SR in the referenced instances' study, new series.

    `references`: node.spool.Instance objects (path, sop_uid, sop_class, study_uid, series_uid), all
    of one study. InputError (one line, no header value) when they are empty, span studies, or the
    first one's header cannot be read or copied."""
    import highdicom as hd

    refs = list({r.sop_uid: r for r in references}.values())
    if not refs:
        raise InputError("a draft report needs at least one referenced instance — pass the "
                         "instances the answer was about")
    if len({r.study_uid for r in refs}) != 1:
        raise InputError("the referenced instances belong to several studies — a draft report "
                         "goes into one study; pass the instances of one study")
    header = _study_header(refs[0])
    evidence = [header] + [_evidence_item(r) for r in refs[1:]]
    try:
        with quiet_pydicom():  # pydicom warns about odd header values, quoting them
            content = _content(question, answer, refs, model_name=model_name,
                               bundle_sha256=bundle_sha256, software_version=software_version)
            sr = hd.sr.ComprehensiveSR(
                evidence=evidence, content=content, series_instance_uid=generate_uid(),
                series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
                manufacturer=MANUFACTURER, manufacturer_model_name=model_name[:64],
                software_versions=f"{MANUFACTURER} {software_version}"[:64],
                series_description=SERIES_DESCRIPTION,
                is_complete=True, is_final=False, is_verified=False,
                specific_character_set="ISO_IR 192",  # UTF-8: an answer may hold any character
            )
    except Exception as err:  # highdicom's messages can quote header values
        raise InputError(f"cannot write the draft report: the referenced image's header was "
                         f"refused ({type(err).__name__}) — check the study's patient and study "
                         f"attributes in the PACS") from None
    return sr


def _study_header(ref) -> Dataset:
    """The first reference's header, with highdicom's Type 2 attributes present."""
    name = f"spool file {Path(ref.path).name}"
    with quiet_pydicom():
        ds = read(Source(name=name, path=Path(ref.path)), header_only=True)
        if str(ds.get("StudyInstanceUID", "")) != ref.study_uid or "SOPInstanceUID" not in ds:
            raise InputError(f"{name}: its header does not match the spool's record — the spool was "
                             f"changed outside the node; receive the study again")
        for keyword in _TYPE2_FROM_EVIDENCE:
            if keyword not in ds or ds[keyword].value is None:
                setattr(ds, keyword, "")
        # highdicom refuses what the standard does not allow, and archives hold such values; the
        # draft then carries the attribute empty (Type 2) rather than not being written at all.
        sex = str(ds.PatientSex).strip().upper()
        ds.PatientSex = sex if sex in _SEXES else ""
        for keyword, vr in _DATES.items():
            try:
                if ds[keyword].value:
                    vr(str(ds[keyword].value))
            except (ValueError, TypeError, OverflowError):
                setattr(ds, keyword, "")
    return ds


def _evidence_item(ref) -> Dataset:
    """What highdicom needs of a referenced instance besides the first: its four UIDs."""
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.study_uid, ref.series_uid
    ds.SOPInstanceUID, ds.SOPClassUID = ref.sop_uid, ref.sop_class
    return ds


def _content(question: str, answer: str, refs: list, *, model_name: str, bundle_sha256: str,
             software_version: str):
    """The TID 2000 content tree (see the module docstring)."""
    import highdicom as hd
    from highdicom.sr import RelationshipTypeValues as Rel

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(bundle_sha256, software_version), name=MANUFACTURER,
            manufacturer_name=MANUFACTURER, model_name=model_name[:64]))
    algorithm = hd.sr.AlgorithmIdentification(
        name=model_name, version=bundle_sha256, manufacturer=MANUFACTURER,
        parameters=[f"runtime {MANUFACTURER} {software_version}"])
    images = [hd.sr.ImageContentItem(
        name=codes.SCT.Source, referenced_sop_class_uid=r.sop_class,
        referenced_sop_instance_uid=r.sop_uid, relationship_type=Rel.INFERRED_FROM) for r in refs]
    finding = hd.sr.TextContentItem(name=codes.DCM.Finding, value=answer,
                                    relationship_type=Rel.CONTAINS)
    finding.ContentSequence = hd.sr.ContentSequence([*algorithm, *images])
    request = hd.sr.TextContentItem(name=codes.DCM.Request, value=question,
                                    relationship_type=Rel.CONTAINS)
    sections = [
        hd.sr.ContainerContentItem(name=codes.DCM.Request, relationship_type=Rel.CONTAINS),
        hd.sr.ContainerContentItem(name=codes.DCM.Findings, relationship_type=Rel.CONTAINS),
    ]
    sections[0].ContentSequence = hd.sr.ContentSequence([request])
    sections[1].ContentSequence = hd.sr.ContentSequence([finding])
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport,
                                      template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence(
        [*hd.sr.ObservationContext(observer_device_context=device), *sections])
    return root


def device_uid(bundle_sha256: str, software_version: str) -> str:
    """The AI's Device Observer UID: the same for every draft of one bundle under one runtime
    version, so a PACS can group a device's results; derived, never stored."""
    return generate_uid(entropy_srcs=[MANUFACTURER, "device", bundle_sha256, software_version])


def answer_text(ds: Dataset) -> str | None:
    """The answer a draft holds (its Findings section's Finding), or None: what tests and the
    server read back."""
    for section in ds.get("ContentSequence", []):
        if _concept(section) != codes.DCM.Findings.value:
            continue
        for item in section.get("ContentSequence", []):
            if item.ValueType == "TEXT" and _concept(item) == codes.DCM.Finding.value:
                return str(item.TextValue)
    return None


def _concept(item: Dataset) -> str | None:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else None

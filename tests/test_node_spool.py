"""The node's spool (medgemma_edge/node/spool.py): durable, owner-only, deduplicated, bounded.

Reference: pydicom reading the same bytes (UIDs and tags of each Instance) and sha256 of the bytes
put. Durability is checked by the order of the system calls (file fsync, then rename, then the
folder's fsync, all before `put` returns) and by what a fresh Spool finds on disk afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import threading
import time
from pathlib import Path

import pydicom
import pytest

from medgemma_edge.node import spool as spool_mod
from medgemma_edge.node.spool import PRUNE_TO, Spool, SpoolFull, hashed
from medgemma_edge.runtime.errors import InputError
from tests.dicom_helpers import PATIENT_MARKERS, image_dataset, shipped, slice_pixels

STUDY_A = "1.2.826.0.1.3680043.8.498.101"
STUDY_B = "1.2.826.0.1.3680043.8.498.102"


def instance_bytes(k: int, *, study: str = STUDY_A, sop: str | None = None, series: str | None = None,
                   side: int = 6) -> bytes:
    """A small CT instance (patient markers included); instance k has its own SOP UID and pixels."""
    ds = image_dataset(slice_pixels(k) if side == 6 else slice_pixels(k).repeat(side // 6, 0).repeat(side // 6, 1),
                       series_uid=series, instance=k + 1)
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop or f"{study}.{k + 1}"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return out.getvalue()


def files_in(root: Path) -> list[Path]:
    return sorted(p for p in (root / "instances").rglob("*") if p.is_file())


def test_put_writes_an_owner_only_file_named_by_hashes_and_reads_back_its_tags(tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 30)
    data = Path(shipped("CT_small.dcm")).read_bytes()
    inst, new = spool.put_new(data)
    ref = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert new
    assert (inst.sop_uid, inst.sop_class, inst.study_uid, inst.series_uid) == (
        ref.SOPInstanceUID, ref.SOPClassUID, ref.StudyInstanceUID, ref.SeriesInstanceUID)
    assert (inst.modality, inst.series_number, inst.instance_number) == (
        ref.Modality, int(ref.SeriesNumber), int(ref.InstanceNumber))
    assert inst.size == len(data) and inst.sha256 == hashlib.sha256(data).hexdigest()
    assert inst.path.read_bytes() == data
    assert inst.path == tmp_path / "spool" / "instances" / hashed(ref.StudyInstanceUID) / f"{hashed(ref.SOPInstanceUID)}.dcm"
    for folder in (tmp_path / "spool", tmp_path / "spool" / "instances", inst.path.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(inst.path.stat().st_mode) == 0o600
    # No UID and no patient value in any name on disk.
    names = " ".join(str(p.relative_to(tmp_path)) for p in (tmp_path / "spool").rglob("*"))
    for value in (ref.SOPInstanceUID, ref.StudyInstanceUID, ref.SeriesInstanceUID, str(ref.PatientName),
                  str(ref.PatientID)):
        assert value not in names
    assert spool.studies() == [ref.StudyInstanceUID] and spool.instances(ref.StudyInstanceUID) == [inst]
    assert spool.used_bytes == len(data)


def test_an_existing_wide_open_root_is_made_owner_only(tmp_path):
    root = tmp_path / "spool"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    Spool(root, 1 << 20)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_the_file_is_synced_renamed_and_its_folder_synced_before_put_returns(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool", 1 << 30)
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        calls.append(f"fsync {kind}")
        return real_fsync(fd)

    def replace(src, dst):
        calls.append("rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    spool.put(instance_bytes(0))
    calls.append("returned")
    # (the first fsync of a folder is `instances/`, for the new study folder's entry)
    assert calls == ["fsync dir", "fsync file", "rename", "fsync dir", "returned"], calls


def test_the_same_bytes_again_are_no_duplicate(tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 30)
    data = instance_bytes(3)
    first, new1 = spool.put_new(data)
    again, new2 = spool.put_new(data)
    assert (new1, new2) == (True, False) and again == first
    assert files_in(tmp_path / "spool") == [first.path] and spool.used_bytes == len(data)


def test_different_bytes_under_a_stored_sop_uid_replace_it(tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 30)
    old = spool.put(instance_bytes(1, sop=f"{STUDY_A}.9"))
    newer_bytes = instance_bytes(2, sop=f"{STUDY_A}.9")
    newer, new = spool.put_new(newer_bytes)
    assert new and newer.path == old.path and newer.path.read_bytes() == newer_bytes
    assert spool.instances(STUDY_A) == [newer] and spool.used_bytes == len(newer_bytes)
    # ... also when it comes filed under another study: the older file goes
    moved = spool.put(instance_bytes(2, study=STUDY_B, sop=f"{STUDY_A}.9"))
    assert files_in(tmp_path / "spool") == [moved.path] and spool.studies() == [STUDY_B]
    assert not old.path.parent.exists() or not any(old.path.parent.iterdir())


def test_a_full_spool_refuses_and_keeps_everything(tmp_path):
    first = instance_bytes(0)
    spool = Spool(tmp_path / "spool", 2 * len(first))
    a = spool.put(first)
    b = spool.put(instance_bytes(1))  # exactly max_bytes: still fits
    before = {p: p.read_bytes() for p in files_in(tmp_path / "spool")}
    with pytest.raises(SpoolFull, match="spool is full"):
        spool.put(instance_bytes(2))
    assert {p: p.read_bytes() for p in files_in(tmp_path / "spool")} == before
    assert spool.instances(STUDY_A) == [a, b] and spool.used_bytes == 2 * len(first)
    assert spool.put_new(first) == (a, False)  # a resend of a stored instance is still answered


def test_a_disk_out_of_space_is_spool_full_and_leaves_no_temp_file(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool", 1 << 30)

    def write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SpoolFull, match="disk holding the spool is full"):
        spool.put(instance_bytes(0))
    monkeypatch.undo()
    assert files_in(tmp_path / "spool") == [] and spool.used_bytes == 0 and spool.studies() == []


@pytest.mark.parametrize("case", ["not dicom", "no study uid", "truncated", "empty"])
def test_what_is_not_a_complete_instance_is_refused_in_one_line_without_values(tmp_path, case):
    data = instance_bytes(0)
    if case == "not dicom":
        data = b"\x89PNG\r\n\x1a\n" + bytes(200)
    elif case == "no study uid":
        ds = pydicom.dcmread(io.BytesIO(data))
        del ds.StudyInstanceUID
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        data = out.getvalue()
    elif case == "truncated":
        data = data[:data.index(b"\x20\x00\x0d\x00") + 20]  # cut inside the Study Instance UID
    else:
        data = b""
    spool = Spool(tmp_path / "spool", 1 << 30)
    with pytest.raises(InputError) as err:
        spool.put(data)
    message = str(err.value)
    print(case, "→", message)
    assert "\n" not in message and files_in(tmp_path / "spool") == []
    for value in [*PATIENT_MARKERS.values(), STUDY_A]:
        assert value not in message


def test_scan_rebuilds_the_index_removes_temp_leftovers_and_leaves_foreign_files(tmp_path):
    root = tmp_path / "spool"
    spool = Spool(root, 1 << 30)
    stored = [spool.put(instance_bytes(k, study=STUDY_A if k < 3 else STUDY_B)) for k in range(5)]
    folder = stored[0].path.parent
    leftover = folder / f".{hashed('x')}.123-4.tmp"  # a write cut by kill -9 before its rename
    leftover.write_bytes(instance_bytes(9)[:100])
    foreign = [folder / "notes.txt", folder / f"{hashed('not-its-uid')}.dcm"]
    foreign[0].write_text("mine")
    foreign[1].write_bytes(instance_bytes(7))  # a real instance, under a name that is not its UID's
    again = Spool(root, 1 << 30)
    found = again.scan()
    assert sorted(found, key=lambda i: i.sop_uid) == sorted(stored, key=lambda i: i.sop_uid)
    assert again.studies() == [STUDY_A, STUDY_B] and again.used_bytes == sum(i.size for i in stored)
    assert not leftover.exists() and all(p.exists() for p in foreign)


def test_concurrent_puts_store_each_instance_once(tmp_path):
    # A fresh spool each round: the first calls race to scan it, and a scan that ran beside a write
    # took that write's temp file (FileNotFoundError, ~1 round in 8 before the fix), so 25 rounds.
    payloads = [instance_bytes(k) for k in range(40)]
    for round_ in range(25):
        spool = Spool(tmp_path / f"spool{round_}", 1 << 30)
        errors = []

        def worker(start):
            try:
                for k in range(start, start + 40):  # every instance is put by four threads
                    spool.put(payloads[k % 40])
            except Exception as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(s,)) for s in (0, 10, 20, 30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, f"round {round_}: {errors[:3]}"
        want = sorted(hashlib.sha256(p).hexdigest() for p in payloads)
        assert sorted(i.sha256 for i in spool.instances(STUDY_A)) == want
        assert len(files_in(tmp_path / f"spool{round_}")) == 40 and spool.used_bytes == sum(map(len, payloads))


def test_a_scan_waits_for_writes_under_way_and_misses_none(tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 30)
    payloads = [instance_bytes(k) for k in range(30)]
    errors = []

    def writer():
        try:
            for data in payloads:
                spool.put(data)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    scans = 0
    while thread.is_alive() and scans < 200:
        spool.scan()  # a restart's rescan, beside a stream of writes
        scans += 1
        time.sleep(0.002)  # room for the writer (scans back to back would hold it off)
    thread.join(60)
    assert not errors, errors[:3]
    assert len(spool.instances(STUDY_A)) == 30 and spool.used_bytes == sum(map(len, payloads))


def test_prune_by_age_then_size_never_a_pinned_study_and_only_its_own_files(tmp_path):
    one = len(instance_bytes(0))
    spool = Spool(tmp_path / "spool", 10 * one, max_age_days=1)
    studies = [f"1.2.826.0.1.3680043.8.498.2{k}" for k in range(4)]
    for n, study in enumerate(studies):
        for k in range(2):
            inst = spool.put(instance_bytes(k, study=study))
            os.utime(inst.path, (1000.0 + n, 1000.0 + n))  # received in study order
    foreign = spool.instances(studies[1])[0].path.parent / "keep-me.txt"
    foreign.write_text("not the spool's")
    spool.scan()  # received times from the files
    now = 1000.0 + 3 + 0.5 * 86400  # nothing is a day old yet
    # 8 instances of 10 = 80 % ≤ 90 %: nothing to do
    assert spool.prune(now=now) == []
    spool.put(instance_bytes(5, study=studies[3]))  # 9 of 10 = 90 %: still not over
    assert spool.prune(now=now) == []
    spool.put(instance_bytes(6, study=studies[3]))  # 10 of 10: over 90 %
    with spool.pinned(studies[0]):
        removed = spool.prune(now=now)
    assert removed == [studies[1]], "the oldest study not pinned goes first, one is enough"
    assert spool.used_bytes <= PRUNE_TO * spool.max_bytes
    assert foreign.exists(), "a file the spool did not write is never deleted"
    # Past the age limit: every study older than a day, except a pinned one
    later = 1000.0 + 2 + 86400 + 1
    with spool.pinned(studies[2]):
        assert spool.prune(now=later) == [studies[0]]
    assert spool.studies() == [studies[2], studies[3]]


def test_remove_study_deletes_only_that_study(tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 30)
    for k in range(3):
        spool.put(instance_bytes(k))
    kept = spool.put(instance_bytes(0, study=STUDY_B))
    assert spool.remove_study(STUDY_A) == 3
    assert spool.studies() == [STUDY_B] and files_in(tmp_path / "spool") == [kept.path]
    assert spool.remove_study(STUDY_A) == 0


def test_a_failed_rename_leaves_nothing_indexed_or_behind(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool", 1 << 30)

    def replace(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spool_mod.os, "replace", replace)
    with pytest.raises(OSError):
        spool.put(instance_bytes(0))
    monkeypatch.undo()
    assert files_in(tmp_path / "spool") == [] and spool.studies() == [] and spool.used_bytes == 0

"""The node's DIMSE listener (medgemma_edge/node/scp.py) against real senders: dcmtk's storescu and
echoscu, Orthanc pushing through its REST API, and pynetdicom as a scriptable SCU for exact statuses.

Reference for "every instance arrived intact": the sha256 of each sent file's dataset (the bytes
after its file meta, which the receiver writes anew), equal to that of the spool file. The listener
runs in this process, or in a child process (`python -m tests.test_node_scp serve …`, below) where
it is killed with SIGKILL or its peak memory (VmHWM) is read. Every generated instance carries
PATIENT_CANARY and the patient markers: no log line of the listener may hold them, or a UID.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medgemma_edge.node.config import NodeConfig, parse_peer
from medgemma_edge.node.scp import (CANNOT_UNDERSTAND, IMAGE_CLASSES, OUT_OF_RESOURCES, STORAGE_CLASSES,
                                    SUCCESS, TRANSFER_SYNTAXES, DicomListener, transfer_syntaxes)
from medgemma_edge.node.spool import Spool
from medgemma_edge.runtime.errors import InputError
from tests.dicom_helpers import (PATIENT_MARKERS, codestream_liar, deflated_dicom, image_dataset, rle_dicom,
                                 shipped)
from medgemma_edge.testing.pacs import Orthanc, echoscu, need, storescu
from medgemma_edge.testing.serve import stop_process

PATIENT_CANARY = "PHI^CANARY"
STUDY = "1.2.826.0.1.3680043.8.498.77"
REPO = Path(__file__).resolve().parents[1]
RSS_BOUND_MB = 600  # generous: the listener holds one instance per association at a time


# ---------------------------------------------------------------------------------------------
# Data and helpers

def make_series(folder: Path, n: int, *, study: str = STUDY, series: int = 1, side: int = 64) -> list[Path]:
    """n CT instances of side² int16 pixels, each distinct, with the canary as patient name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        pixels = (np.arange(side * side, dtype=np.int16).reshape(side, side) + 7 * k + 1000 * series)
        ds = image_dataset(pixels, series_uid=f"{study}.{series}", instance=k + 1)
        ds.PatientName = PATIENT_CANARY
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.{series}.{k + 1}"
        ds.save_as(folder / f"s{series}-{k:03d}.dcm", enforce_file_format=True, implicit_vr=False,
                   little_endian=True)
        paths.append(folder / f"s{series}-{k:03d}.dcm")
    return paths


def body(data: bytes) -> bytes:
    """A DICOM file's dataset: what goes over the network (the file meta is the receiver's own),
    less a final Data Set Trailing Padding element (explicit VR little endian), which PS3.10 7.2
    lets a sender drop and dcmtk (in storescu and Orthanc) does."""
    assert data[128:132] == b"DICM"
    data = data[144 + struct.unpack("<I", data[140:144])[0]:]
    at = data.rfind(b"\xfc\xff\xfc\xffOB\x00\x00")
    if at >= 0 and at + 12 + struct.unpack("<I", data[at + 8:at + 12])[0] == len(data):
        data = data[:at]
    return data


def body_sha(path: Path) -> str:
    return hashlib.sha256(body(Path(path).read_bytes())).hexdigest()


def spooled(root: Path) -> dict[str, list[str]]:
    """SOP UID → sha256 of the dataset of every spool file holding it (a fresh scan of the disk)."""
    found: dict[str, list[str]] = {}
    for inst in Spool(root, 1 << 40).scan():
        found.setdefault(inst.sop_uid, []).append(body_sha(inst.path))
    return found


def sop_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_all_in_spool(root: Path, sent: list[Path]) -> None:
    found = spooled(root)
    want = {sop_of(p): body_sha(p) for p in sent}
    missing = sorted(set(want) - set(found))
    wrong = sorted(uid for uid in set(want) & set(found) if found[uid] != [want[uid]])
    assert not missing and not wrong, f"{len(missing)} of {len(want)} missing, {len(wrong)} differ or doubled"
    files = [p for p in (root / "instances").rglob("*") if p.is_file()]
    assert len(files) == len(found) and not [p for p in files if p.suffix != ".dcm"], "duplicates or temp files"


def assert_no_phi(text: str, *uids: str) -> None:
    for value in [PATIENT_CANARY, *PATIENT_MARKERS.values(), *uids]:
        assert value not in text, f"{value!r} reached the log"


@contextlib.contextmanager
def listening(tmp_path: Path, *, max_bytes: int = 1 << 30, **config):
    spool = Spool(tmp_path / "spool", max_bytes)
    got, refused = [], []
    cfg = NodeConfig(port=0, **config).check()
    with DicomListener(cfg, spool, got.append, lambda ae, why: refused.append((ae, why))) as listener:
        listener.got, listener.refused = got, refused
        yield listener


def scu_send(port: int, paths: list[Path], *, aet: str = "PYSCU") -> list:
    """pynetdicom sends each file's bytes as they are (no decode): its status, or "no context"."""
    from pynetdicom import AE, _config
    from pydicom.filereader import read_file_meta_info

    metas = [read_file_meta_info(p) for p in paths]
    ae = AE(ae_title=aet)
    for pair in dict.fromkeys((str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas):
        ae.add_requested_context(*pair)
    saved, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="MGE")
        assert not assoc.is_rejected, "association rejected"
        if not assoc.is_established:  # accepted, but none of its contexts: pynetdicom aborts
            return ["no context"] * len(paths)
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        out = []
        for path, meta in zip(paths, metas):
            if (meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID) not in accepted:
                out.append("no context")
                continue
            rsp = assoc.send_c_store(path)
            out.append(int(rsp.Status) if "Status" in rsp else "no response")
        assoc.release()
        return out
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved


def scu_echo(port: int) -> int:
    from pynetdicom import AE

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="MGE")
    assert assoc.is_established
    status = int(assoc.send_c_echo().Status)
    assoc.release()
    return status


# ---------------------------------------------------------------------------------------------
# The listener in a child process

class Child:
    """`python -m tests.test_node_scp serve SPOOL …`: its port, stderr (DEBUG logging), pid."""

    def __init__(self, spool: Path, log: Path, *args: str):
        self.log = log
        with open(log, "ab") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "tests.test_node_scp", "serve", str(spool), *args],
                                            cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        line = self.process.stdout.readline()
        assert line.startswith("PORT "), f"the listener did not start:\n{log.read_text()[-3000:]}"
        self.port = int(line.split()[1])

    def peak_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) / 1024

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        stop_process(self.process)


def _serve(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("spool")
    parser.add_argument("--max-bytes", type=int, default=1 << 30)
    parser.add_argument("--delay-s", type=float, default=0.0, help="after each durable write, before the status")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    spool = Spool(Path(args.spool), args.max_bytes)
    print(f"spool: {len(spool.scan())} instances at start", file=sys.stderr)

    def noted(inst):
        time.sleep(args.delay_s)  # the window between "stored" and "acknowledged", widened

    listener = DicomListener(NodeConfig(port=0), spool, noted).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    print(f"PORT {listener.port}", flush=True)
    stop.wait()
    listener.stop()


# ---------------------------------------------------------------------------------------------
# What the listener accepts

@pytest.mark.parametrize("text, port, want", [
    ("ORTHANC@127.0.0.1:4242", True, ("ORTHANC", "127.0.0.1", 4242)),
    ("CT1@pacs.clinic.local", False, ("CT1", "pacs.clinic.local", None)),
    (" MR 2 @[::1]:104", None, ("MR 2", "::1", 104)),
    ("A@", None, None), ("ORTHANC@127.0.0.1", True, None), ("CT1@10.0.0.1:104", False, None),
    ("@10.0.0.1", None, None), ("TOO_LONG_AE_TITLE_X@h", None, None), ("A@h:70000", None, None),
    ("A@bad host", None, None), ("BACK\\SLASH@h", None, None),
])
def test_parse_peer(text, port, want):
    if want is None:
        with pytest.raises(InputError) as err:
            parse_peer(text, port=port)
        assert "\n" not in str(err.value)
    else:
        peer = parse_peer(text, port=port)
        assert (peer.ae, peer.host, peer.port) == want


def test_node_config_check():
    assert NodeConfig(port=104).check().spool_bytes == 20 << 30
    assert NodeConfig(port=104, host="0.0.0.0", allow=(parse_peer("CT1@10.0.0.7"),)).check()
    for bad, says in [(dict(host="0.0.0.0"), "--dicom-allow"), (dict(ae_title="x" * 17), "AE title"),
                      (dict(prepare="later"), "auto or off"), (dict(spool_gb=0), "--spool-gb"),
                      (dict(results_to=parse_peer("PACS@h")), "AE@HOST:PORT"), (dict(dicomweb="ftp://x"), "http"),
                      (dict(port=70000), "--dicom-port")]:
        with pytest.raises(InputError, match=says):
            NodeConfig(**{"port": 104, **bad}).check()


def test_each_transfer_syntax_has_a_decoder_and_each_class_exists():
    from pydicom.pixels import get_decoder
    from pynetdicom import sop_class

    for uid in transfer_syntaxes():
        assert get_decoder(uid).is_available, f"{uid.name}: offered, but pydicom cannot decode it here"
    assert len(transfer_syntaxes()) == len(TRANSFER_SYNTAXES)
    for name in STORAGE_CLASSES:
        uid = getattr(sop_class, name)
        assert uid.startswith("1.2.840.10008.5.1.4.1.1."), name
    assert all("ImageStorage" in name for name in IMAGE_CLASSES)


def test_storescu_and_orthanc_pushes_land_in_the_spool_intact(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    ct = make_series(tmp_path / "ct", 12, series=1)
    via_storescu = make_series(tmp_path / "more", 6, series=2)
    xray = tmp_path / "xray.dcm"
    ds = pydicom.dcmread(shipped("MR_small.dcm"))  # a shipped file, sent as an X-ray (DX) by Orthanc
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality, ds.PatientName = "DX", PATIENT_CANARY
    ds.save_as(xray)
    with listening(tmp_path) as node, Orthanc(tmp_path / "orthanc",
                                              modalities={"mge": ("MGE", "127.0.0.1", node.port)}) as pacs:
        ids = [pacs.upload(p.read_bytes()) for p in [*ct, xray, Path(shipped("CT_small.dcm"))]]
        job = pacs.send("mge", ids)
        assert job.get("FailedInstancesCount", 0) == 0, job
        done = storescu(via_storescu, node.port, "MGE", check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        echo = echoscu(node.port, "MGE")
        assert echo.returncode == 0, echo.stderr[-2000:]
        got = list(node.got)
    sent = [*ct, xray, Path(shipped("CT_small.dcm")), *via_storescu]
    assert len(got) == len(sent)
    assert_all_in_spool(tmp_path / "spool", sent)
    assert_no_phi(caplog.text, STUDY)


def test_an_association_from_outside_the_allow_list_is_rejected(tmp_path):
    need("storescu")
    files = make_series(tmp_path / "s", 2)
    allow = (parse_peer("STORESCU@127.0.0.1"), parse_peer("ECHOSCU@10.9.8.7"))
    with listening(tmp_path, allow=allow) as node:
        stranger = storescu(files, node.port, "MGE", aet="STRANGER", check=False)
        wrong_host = echoscu(node.port, "MGE")  # ECHOSCU is allowed, but from 10.9.8.7 only
        allowed = storescu(files, node.port, "MGE", check=False)
        refused = list(node.refused)
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr, stranger.stderr
    assert wrong_host.returncode != 0 and "Calling AE Title Not Recognized" in wrong_host.stderr, wrong_host.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert [ae for ae, _ in refused] == ["STRANGER", "ECHOSCU"] and all("--dicom-allow" in why for _, why in refused)
    assert_all_in_spool(tmp_path / "spool", files)


def test_kill_9_mid_transfer_loses_no_acknowledged_instance_and_a_resend_adds_no_duplicate(tmp_path):
    need("storescu")
    files = make_series(tmp_path / "s", 40, side=128)
    by_name = {str(p): p for p in files}
    root, log = tmp_path / "spool", tmp_path / "listener.log"
    child = Child(root, log, "--delay-s", "0.03")
    try:
        out = tmp_path / "storescu.log"
        with open(out, "w") as fh:
            sender = subprocess.Popen([need("storescu"), "-v", "-aec", "MGE", "127.0.0.1", str(child.port),
                                       *map(str, files)], stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while len(list((root / "instances").rglob("*.dcm"))) < 10:  # some stored, most not yet
            assert time.monotonic() < deadline and sender.poll() is None, out.read_text()[-2000:]
            time.sleep(0.005)
        child.kill()
        sender.wait(60)
    finally:
        child.kill()
    acked, current = [], None
    for line in out.read_text().splitlines():
        if line.startswith("I: Sending file: "):
            current = by_name[line.removeprefix("I: Sending file: ").strip()]
        elif "Received Store Response (Success)" in line:
            acked.append(current)
    print(f"acknowledged before the kill: {len(acked)} of {len(files)}")
    assert 5 <= len(acked) < len(files), "the kill did not land mid-transfer"
    child = Child(root, log)  # restart: the spool is re-read
    try:
        assert_all_in_spool(root, acked)
        resent = storescu(files, child.port, "MGE", check=False)
        assert resent.returncode == 0, resent.stderr[-2000:]
    finally:
        child.stop()
    assert_all_in_spool(root, files)
    assert len(spooled(root)) == len(files)
    assert_no_phi(log.read_text(), STUDY)


def test_a_full_spool_answers_out_of_resources_and_keeps_what_it_had(tmp_path):
    files = make_series(tmp_path / "s", 6)
    one = max(p.stat().st_size for p in files) + 400  # the receiver's file meta differs a little
    with listening(tmp_path, max_bytes=3 * one) as node:
        statuses = scu_send(node.port, files)
        assert scu_echo(node.port) == SUCCESS
    assert statuses == [SUCCESS] * 3 + [OUT_OF_RESOURCES] * 3, [hex(s) for s in statuses]
    assert_all_in_spool(tmp_path / "spool", files[:3])
    assert len(spooled(tmp_path / "spool")) == 3


def _with_study_uid(data: bytes) -> bytes:
    """An explicit-VR little-endian file with a Study Instance UID put before its Series UID."""
    at = data.index(b"\x20\x00\x0e\x00UI")
    uid = STUDY.encode() + b"\0" * (len(STUDY) % 2)
    return data[:at] + b"\x20\x00\x0d\x00UI" + struct.pack("<H", len(uid)) + uid + data[at:]


def _hostile_files(folder: Path) -> dict[str, Path]:
    ct = Path(shipped("CT_small.dcm")).read_bytes()
    valid = make_series(folder / "valid", 1)[0].read_bytes()
    many = pydicom.dcmread(io.BytesIO(valid))
    for block in range(0x10, 0x60):  # a header of 20,480 private elements
        many.add_new((0x0011, block), "LO", f"CREATOR{block}")
        for e in range(256):
            many.add_new((0x0011, block << 8 | e), "UL", e)
    many_out = io.BytesIO()
    many.save_as(many_out, enforce_file_format=True)
    big = pydicom.dcmread(io.BytesIO(valid))
    big.add_new((0x0011, 0x0010), "LO", "BIG")
    big.add_new((0x0011, 0x1000), "OB", bytes(16 << 20))  # a 16 MiB value inside the header
    big_out = io.BytesIO()
    big.save_as(big_out, enforce_file_format=True)
    liar = bytearray(big_out.getvalue())
    at = liar.index(b"\x11\x00\x00\x10OB")
    struct.pack_into("<I", liar, at + 8, 0x7FFFFFF0)  # claims 2 GB, holds 16 MiB
    cases = {
        "RLE bomb, claims 16384²": rle_dicom(16384, 16384, encoded=(16, 16)),
        "RLE bomb with a study UID": _with_study_uid(rle_dicom(16384, 16384, encoded=(16, 16))),
        "deflate bomb, claims 16384²": deflated_dicom(16384, 16384, pixel_bytes=4096),
        "deflate bomb, inflates to 64 MiB": deflated_dicom(8192, 8192),
        "JPEG SOF claims 60000²": _with_study_uid(codestream_liar("SC_rgb_jpeg_dcmtk.dcm")),
        "J2K SIZ claims 60000²": codestream_liar("MR_small_jp2klossless.dcm"),
        "truncated header": ct[:ct.index(b"\xe0\x7f\x10\x00") // 2],
        "garbage after the file meta": valid[:valid.index(b"\x08\x00")] + os.urandom(4000),
        "an element claiming 2 GB": bytes(liar),
        "20,480 private elements": many_out.getvalue(),
        "a 16 MiB header value": big_out.getvalue(),
        "RT plan (a class the node does not take)": Path(shipped("rtplan.dcm")).read_bytes(),
    }
    paths = {}
    for n, (name, data) in enumerate(cases.items()):
        paths[name] = folder / f"hostile{n}.dcm"
        paths[name].write_bytes(data)
    return paths


def test_hostile_dicom_over_the_network_is_refused_and_the_listener_keeps_answering(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cases = _hostile_files(tmp_path)
    # Refused, or stored untouched for the preparation to judge (a header that reads is a DICOM
    # instance; its pixels are bounded when decoded): never an exception, never a silent drop.
    may_store = {"RLE bomb with a study UID", "JPEG SOF claims 60000²", "J2K SIZ claims 60000²", "20,480 private elements",
                 "a 16 MiB header value"}
    with listening(tmp_path) as node:
        results = {}
        for name, path in cases.items():  # one association each: a failure names its case
            started = time.monotonic()
            results[name] = scu_send(node.port, [path])[0]
            print(f"{name}: {results[name] if isinstance(results[name], str) else hex(results[name])} "
                  f"in {time.monotonic() - started:.2f} s")
        rtplan = storescu([cases["RT plan (a class the node does not take)"]], node.port, "MGE", check=False)
        assert scu_echo(node.port) == SUCCESS
        assert echoscu(node.port, "MGE").returncode == 0
        after = make_series(tmp_path / "after", 2)
        assert scu_send(node.port, after) == [SUCCESS, SUCCESS]
        stored = list(node.got)
    for name, status in results.items():
        if name.startswith("RT plan"):
            assert status == "no context"
        elif name in may_store:
            assert status in (SUCCESS, CANNOT_UNDERSTAND), (name, status)
        else:
            assert status == CANNOT_UNDERSTAND, (name, status)
    assert rtplan.returncode != 0 and "no presentation context" in rtplan.stderr.lower(), rtplan.stderr
    stored_names = [n for n in cases if results[n] == SUCCESS]
    assert len(stored) == len(stored_names) + 2
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == sum(s == CANNOT_UNDERSTAND for s in results.values())
    assert all("\n" not in line for line in refusals)
    assert_no_phi(caplog.text, STUDY)


def test_ten_concurrent_associations_lose_nothing_and_memory_stays_bounded(tmp_path):
    need("storescu")
    senders = [make_series(tmp_path / f"m{k}", 30, study=f"{STUDY}.{k}", series=k, side=256) for k in range(10)]
    root, log = tmp_path / "spool", tmp_path / "listener.log"
    child = Child(root, log)
    try:
        started = time.monotonic()
        procs = [subprocess.Popen([need("storescu"), "-aet", f"MODALITY{k}", "-aec", "MGE", "127.0.0.1",
                                   str(child.port), *map(str, files)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for k, files in enumerate(senders)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        seconds = time.monotonic() - started
        peak = child.peak_mb()
    finally:
        child.stop()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-2000:]
    sent = [p for files in senders for p in files]
    megabytes = sum(p.stat().st_size for p in sent) / 2**20
    print(f"10 associations × 30 instances ({megabytes:.1f} MB) in {seconds:.2f} s; listener peak RSS "
          f"(VmHWM) {peak:.0f} MB")
    assert_all_in_spool(root, sent)
    assert peak < RSS_BOUND_MB, f"listener peak RSS {peak:.0f} MB over {RSS_BOUND_MB} MB"
    assert_no_phi(log.read_text(), STUDY)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve(sys.argv[2:])

"""Pulling studies over DICOMweb (medgemma_edge/node/dicomweb.py) from a real Orthanc with its DICOMweb
plugin (medgemma_edge/testing/pacs.py), and reading Google's image_dicom content part.

A CT series and an X-ray are uploaded to Orthanc by REST; fetch_study must put every instance into
the spool with the SOP UIDs Orthanc lists and pixel data equal byte for byte to Orthanc's stored
files. Errors (unknown study, unreachable or lying server, bounds) are one line without a UID or a
patient value; URIs on another host, port, scheme or path prefix are refused.
"""

from __future__ import annotations

import http.server
import logging
import threading
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from benchmarks.inputs import write_dx
from medgemma_edge.node.dicomweb import (PacsError, StudyNotFound, check_base_url, check_uid, fetch_study,
                                         image_dicom_sources)
from medgemma_edge.node.spool import Spool
from medgemma_edge.runtime.errors import InputError
from tests.dicom_helpers import PATIENT_MARKERS, with_patient, write_series
from medgemma_edge.testing.pacs import Orthanc, free_port

CT_SLICES = 5


class _Spool(Spool):
    """The node's spool, counting what it is asked to store."""

    def __init__(self, root: Path):
        super().__init__(root, 1 << 30)
        self.puts = 0

    def put(self, data: bytes):
        self.puts += 1
        return super().put(data)


# -- Orthanc holding a CT series and an X-ray ----------------------------------------------------------
@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicomweb")
    ct = write_series(folder / "ct", CT_SLICES, positions=True)
    xray = folder / "xray.dcm"
    write_dx(xray, (np.arange(48 * 40).reshape(48, 40) % 4096).astype(np.uint16))
    ds = with_patient(pydicom.dcmread(xray))
    ds.save_as(xray)
    with Orthanc(folder / "orthanc") as orthanc:
        for path in [*ct, xray]:
            orthanc.upload(path.read_bytes())
        orthanc.studies = {name: pydicom.dcmread(paths[0]).StudyInstanceUID for name, paths in
                           (("ct", ct), ("xray", [xray]))}
        yield orthanc


def orthanc_instances(pacs: Orthanc, study_uid: str) -> dict[str, bytes]:
    """SOP Instance UID -> the file Orthanc stores, for every instance of the study."""
    found = httpx.post(pacs.url + "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                                       "Expand": True}, timeout=30).json()
    return {i["MainDicomTags"]["SOPInstanceUID"]: httpx.get(pacs.url + f"/instances/{i['ID']}/file", timeout=30).content
            for i in found}


def no_secrets(text: str, *uids: str) -> None:
    """No patient value and no UID in a message or a log."""
    leaked = [v for v in PATIENT_MARKERS.values() if v.split("^")[0] in text] + [u for u in uids if u in text]
    assert not leaked, f"leaked {leaked} in: {text}"


@pytest.mark.parametrize("name", ["ct", "xray"])
def test_fetch_study_puts_every_instance_in_the_spool(pacs, tmp_path, name, caplog):
    study = pacs.studies[name]
    spool = _Spool(tmp_path / "spool")
    with caplog.at_level(logging.DEBUG):
        got = fetch_study(pacs.dicomweb, study, spool)
    want = orthanc_instances(pacs, study)
    assert sorted(i.sop_uid for i in got) == sorted(want), "the spool holds other SOP instances than Orthanc"
    assert len(got) == (CT_SLICES if name == "ct" else 1)
    for inst in got:
        ours, theirs = pydicom.dcmread(inst.path), pydicom.dcmread(pydicom.filebase.DicomBytesIO(want[inst.sop_uid]))
        assert ours.file_meta.TransferSyntaxUID == theirs.file_meta.TransferSyntaxUID
        a, b = np.frombuffer(ours.PixelData, np.uint8), np.frombuffer(theirs.PixelData, np.uint8)
        assert a.shape == b.shape and (a == b).all(), \
            f"pixel data differs: {int((a != b).sum()) if a.shape == b.shape else 'length'} bytes"
        assert inst.study_uid == study
        # written back as read: the whole file equals what Orthanc stores (it keeps what it received)
        assert inst.path.read_bytes() == want[inst.sop_uid], "the spooled file differs from Orthanc's"
    no_secrets(caplog.text, study, *want)


def test_a_second_fetch_takes_what_the_spool_holds(pacs, tmp_path):
    spool = _Spool(tmp_path / "spool")
    first = fetch_study(pacs.dicomweb, pacs.studies["ct"], spool)
    again = fetch_study(pacs.dicomweb, pacs.studies["ct"], spool)
    assert spool.puts == CT_SLICES, f"{spool.puts} puts for {CT_SLICES} instances fetched twice"
    assert [i.sop_uid for i in again] == [i.sop_uid for i in first]


def test_one_series_or_one_instance(pacs, tmp_path):
    study = pacs.studies["ct"]
    listed = fetch_study(pacs.dicomweb, study, _Spool(tmp_path / "a"))
    series, sop = listed[0].series_uid, listed[2].sop_uid
    assert len(fetch_study(pacs.dicomweb, study, _Spool(tmp_path / "b"), series_uid=series)) == CT_SLICES
    one = fetch_study(pacs.dicomweb, study, _Spool(tmp_path / "c"), series_uid=series, sop_uid=sop)
    assert [i.sop_uid for i in one] == [sop]


def one_line(err: BaseException, *uids: str) -> str:
    text = str(err)
    assert text and "\n" not in text, f"not one line: {text!r}"
    no_secrets(text, *uids)
    return text


def test_unknown_study_series_and_instance(pacs, tmp_path):
    spool = _Spool(tmp_path / "spool")
    for kw in ({}, {"series_uid": "1.2.3.4.5"}, {"series_uid": "1.2.3.4.5", "sop_uid": "1.2.3.4.6"}):
        with pytest.raises(StudyNotFound) as err:
            fetch_study(pacs.dicomweb, "1.2.3.999", spool, **kw)
        assert "has no such" in one_line(err.value, "1.2.3.999"), err.value
    assert isinstance(err.value, InputError) and spool.puts == 0


def test_unreachable_server_is_one_line(tmp_path):
    with pytest.raises(PacsError) as err:
        fetch_study(f"http://127.0.0.1:{free_port()}/dicom-web", "1.2.3", _Spool(tmp_path))
    assert "does not answer" in one_line(err.value, "1.2.3")


def test_a_bad_uid_is_the_clients_fault(pacs, tmp_path):
    for bad in ("1.2.x", "", "1" * 65, "../1.2", None):
        with pytest.raises(InputError):
            fetch_study(pacs.dicomweb, bad, _Spool(tmp_path))
    assert check_uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"


def test_bounds_on_instances_and_bytes(pacs, tmp_path):
    study = pacs.studies["ct"]
    spool = _Spool(tmp_path / "spool")
    with pytest.raises(InputError) as err:
        fetch_study(pacs.dicomweb, study, spool, max_instances=CT_SLICES - 1)
    assert f"more than {CT_SLICES - 1} instances" in one_line(err.value, study) and spool.puts == 0
    with pytest.raises(InputError) as err:
        fetch_study(pacs.dicomweb, study, spool, max_bytes=1000)
    assert "larger than the node fetches" in one_line(err.value, study) and spool.puts == 0


class _Liar(http.server.BaseHTTPRequestHandler):
    """A web server that is no DICOMweb server: `mode` says how it lies."""
    mode = "html"
    target = ""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.mode == "redirect":
            self.send_response(302)
            self.send_header("Location", self.target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.mode == "json" and "/instances" in self.path and "/instances/" not in self.path:
            body, kind = (b'[{"00080018": {"vr": "UI", "Value": ["1.2.3.4"]}, '
                          b'"0020000E": {"vr": "UI", "Value": ["1.2.3.5"]}}]'), "application/dicom+json"
            if "offset" in self.path:
                body = b"[]"
        elif self.mode == "huge":
            body, kind = b"[" + b" " * (70 << 20) + b"]", "application/dicom+json"
        elif self.mode == "json":  # WADO-RS: not multipart, not DICOM
            body, kind = b"--x\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--x--", \
                'multipart/related; type="application/dicom"; boundary=x'
        else:
            body, kind = b"<html><body>Welcome to the hospital intranet</body></html>", "text/html"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except ConnectionError:  # the node hung up on an answer past its bound
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def liar():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode", ["html", "json", "huge"])
def test_an_answer_that_is_not_dicomweb(liar, mode, tmp_path):
    _Liar.mode = mode
    spool = _Spool(tmp_path / "spool")
    with pytest.raises((PacsError, InputError)) as err:
        fetch_study(f"http://127.0.0.1:{liar.server_port}/dicom-web", "1.2.3", spool)
    text = one_line(err.value, "1.2.3", "1.2.3.4")
    if mode == "huge":
        assert isinstance(err.value, InputError) and "larger than" in text, text
    else:
        assert isinstance(err.value, PacsError) and "not DICOMweb" in text, text
    assert spool.puts == 0


def test_a_redirect_is_not_followed(liar, pacs, tmp_path):
    _Liar.mode, _Liar.target = "redirect", pacs.url
    with pytest.raises(PacsError) as err:
        fetch_study(f"http://127.0.0.1:{liar.server_port}/dicom-web", pacs.studies["ct"], _Spool(tmp_path))
    assert "redirected" in one_line(err.value, pacs.studies["ct"])


# -- image_dicom ---------------------------------------------------------------------------------------
BASE = "http://127.0.0.1:8042/dicom-web"


def part(*uris):
    return {"type": "image_dicom", "image_dicom": {"dicom_source": list(uris)}}


def test_image_dicom_uris_name_study_series_instance():
    got = image_dicom_sources(part(f"{BASE}/studies/1.2.3", f"{BASE}/studies/1.2.3/series/4.5/",
                                   f"{BASE}/studies/1.2.3/series/4.5/instances/6.7",
                                   "HTTP://127.0.0.1:8042/dicom-web/studies/%31.2.3",  # scheme case, encoded digit
                                   "http://127.0.0.1:8042/dicom-web/studies/1.2.3"), BASE + "/")
    assert got == [("1.2.3", None, None), ("1.2.3", "4.5", None), ("1.2.3", "4.5", "6.7"),
                   ("1.2.3", None, None), ("1.2.3", None, None)]
    assert image_dicom_sources({"image_dicom": {"dicom_source": "http://pacs/studies/1.2"}}, "http://PACS:80") \
        == [("1.2", None, None)]  # one URI as a string, default port, host case
    assert image_dicom_sources(part("https://pacs.example:443/a/b/studies/9"), "https://pacs.example/a/b") \
        == [("9", None, None)]
    extra = {"type": "image_dicom", "image_dicom": {"dicom_source": [f"{BASE}/studies/1.2"],
                                                    "access_credential": "secret-token"}}
    assert image_dicom_sources(extra, BASE) == [("1.2", None, None)]


ELSEWHERE = [
    "http://127.0.0.2:8042/dicom-web/studies/1.2.3",  # another host
    "http://localhost:8042/dicom-web/studies/1.2.3",  # the same machine by another name is another host
    "http://127.0.0.1:8043/dicom-web/studies/1.2.3",  # another port
    "http://127.0.0.1/dicom-web/studies/1.2.3",  # default port 80
    "https://127.0.0.1:8042/dicom-web/studies/1.2.3",  # another scheme
    "http://127.0.0.1:8042/other/studies/1.2.3",  # another prefix
    "http://127.0.0.1:8042/dicom-webx/studies/1.2.3",  # a prefix of the prefix is no prefix
    "http://127.0.0.1:8042/studies/1.2.3",  # no prefix
    "http://127.0.0.1:8042@evil.example/dicom-web/studies/1.2.3",  # userinfo: the host is evil.example
    "http://evil.example#@127.0.0.1:8042/dicom-web/studies/1.2.3",
    "http://127.0.0.1.evil.example:8042/dicom-web/studies/1.2.3",
    "ftp://127.0.0.1:8042/dicom-web/studies/1.2.3",
    "//127.0.0.1:8042/dicom-web/studies/1.2.3",
]
MALFORMED = [
    "http://user@127.0.0.1:8042/dicom-web/studies/1.2.3",  # credentials for the right host
    "http://127.0.0.1:8042/dicom-web/../dicom-web/studies/1.2.3",
    "http://127.0.0.1:8042/dicom-web/studies/%2e%2e/studies/1.2.3",
    "http://127.0.0.1:8042/dicom-web%2Fstudies/1.2.3",
    "http://127.0.0.1:8042/dicom-web//studies/1.2.3",
    "http://127.0.0.1:8042/dicom-web/studies/1.2.3?x=1",
    "http://127.0.0.1:8042/dicom-web/studies/1.2.3#f",
    "http://127.0.0.1:8042\\dicom-web/studies/1.2.3",
    "http://127.0.0.1:8042/dicom-web/studies/1.2.3/series",
    "http://127.0.0.1:8042/dicom-web/studies/1.2.3/series/4/instances/5/frames/1",
    "http://127.0.0.1:8042/dicom-web/studies/1.2.3/rendered",
    "http://127.0.0.1:8042/dicom-web/series/1.2.3",
    "http://127.0.0.1:8042/dicom-web/studies/1.2.x",
    "http://127.0.0.1:8042/dicom-web/studies/%ff",
    "http://127.0.0.1:8042/dicom-web/studies/1.2.3\n",
    "http://127.0.0.1:99999/dicom-web/studies/1.2.3",
    "http://127.0.0.1:8042/dicom-web/studies/" + "1." * 40 + "1",
]


@pytest.mark.parametrize("uri", ELSEWHERE)
def test_uris_elsewhere_are_refused(uri):
    with pytest.raises(InputError) as err:
        image_dicom_sources(part(f"{BASE}/studies/1.2", uri), BASE)
    text = one_line(err.value)
    assert "dicom_source[1]" in text and ("no other host" in text or "http(s) URL" in text), text
    assert "evil" not in text, text  # the URI is named by its place, not echoed


@pytest.mark.parametrize("uri", MALFORMED)
def test_malformed_uris_are_refused(uri):
    with pytest.raises(InputError) as err:
        image_dicom_sources(part(uri), BASE)
    assert "dicom_source[0]" in one_line(err.value), err.value


@pytest.mark.parametrize("bad", [{}, {"image_dicom": {}}, part(), {"image_dicom": {"dicom_source": [1]}},
                                 {"image_dicom": {"dicom_source": [f"{BASE}/studies/1"] * 300}}, "x"])
def test_a_malformed_part_is_refused(bad):
    with pytest.raises(InputError):
        image_dicom_sources(bad, BASE)


def test_a_node_without_dicomweb_fetches_nothing():
    with pytest.raises(InputError) as err:
        image_dicom_sources(part(f"{BASE}/studies/1.2"), None)
    assert "--dicomweb" in one_line(err.value)


def test_the_configured_url_is_checked():
    assert check_base_url(BASE + "/") == BASE + "/"
    for bad in ("http://user:secret@127.0.0.1:8042/dicom-web", "http://127.0.0.1:8042/dicom-web?x=1",
                "ftp://127.0.0.1/dicom-web", "http://127.0.0.1:8042/a/../dicom-web", "127.0.0.1:8042"):
        with pytest.raises(InputError) as err:
            check_base_url(bad)
        assert "secret" not in one_line(err.value), err.value

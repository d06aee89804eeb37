"""A real PACS and a real modality for the node's tests and benchmark: Debian's Orthanc (with its DICOMweb
plugin) started as a plain user process on free loopback ports with a generated configuration,
stopped by its pid; dcmtk's `storescu`/`echoscu` as the modality.

`make test` installs them (`orthanc orthanc-dicomweb dcmtk`, as root). A test that needs one fails
when it is missing; it never skips.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

from medgemma_edge.testing.serve import stop_process

START_S = 30.0  # Orthanc 1.10 is up in about a second; a loaded machine may take longer
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",)


def free_port() -> int:
    """A loopback port nobody listens on once this returns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(program: str) -> str:
    """The path of `program`; a failing assertion naming the package when it is missing."""
    path = shutil.which(program)
    assert path, (f"{program} is missing: `make test` installs orthanc, orthanc-dicomweb and dcmtk "
                  "(apt-get install -y orthanc orthanc-dicomweb dcmtk, as root)")
    return path


class Orthanc:
    """`with Orthanc(tmp_path, modalities={"mge": ("MGE", "127.0.0.1", port)}) as pacs:` —
    `pacs.url` (REST), `pacs.dicomweb` (DICOMweb root), `pacs.port`/`pacs.aet` (DIMSE)."""

    def __init__(self, folder: Path, modalities: dict | None = None, aet: str = "ORTHANC"):
        self.folder, self.aet = Path(folder), aet
        self.http_port, self.port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = self.url + "/dicom-web"
        plugins = [p for p in DICOMWEB_PLUGINS if Path(p).exists()]
        assert plugins, "Orthanc's DICOMweb plugin is missing: apt-get install -y orthanc-dicomweb"
        self.config = {
            "Name": "medgemma-edge-test", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "HttpPort": self.http_port, "DicomPort": self.port,
            "DicomAet": aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "Plugins": plugins, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "StableAge": 1,
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> "Orthanc":
        binary = need("Orthanc")
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=1))
        self.log = self.folder / "orthanc.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([binary, str(cfg)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_S
        while True:
            assert self.process.poll() is None, f"Orthanc exited:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/system", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"Orthanc not up in {START_S} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 15)

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- REST helpers ---------------------------------------------------------------------------
    def get(self, path: str, **kw):
        response = httpx.get(self.url + path, timeout=60, **kw)
        response.raise_for_status()
        return response.json()

    def upload(self, data: bytes) -> str:
        """Store one DICOM file through REST; its Orthanc instance id."""
        response = httpx.post(self.url + "/instances", content=data, timeout=60)
        response.raise_for_status()
        return response.json()["ID"]

    def send(self, modality: str, resources: list[str], timeout: float = 120) -> dict:
        """C-STORE of Orthanc resources (instance/series/study ids) to a configured modality."""
        response = httpx.post(self.url + f"/modalities/{modality}/store",
                              json={"Resources": resources, "Synchronous": True}, timeout=timeout)
        response.raise_for_status()
        return response.json()


def storescu(files, port: int, aec: str, aet: str = "STORESCU", host: str = "127.0.0.1",
             check: bool = True, required: bool = False) -> subprocess.CompletedProcess:
    """dcmtk's storescu sending `files` to AE `aec` at host:port (one association). `required`:
    propose only the files' own SOP classes (-R; storescu's default list lacks some, e.g. whole-slide
    microscopy)."""
    cmd = [need("storescu"), *(["-R"] if required else []), "-aet", aet, "-aec", aec, host, str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=check)


def echoscu(port: int, aec: str, aet: str = "ECHOSCU", host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    return subprocess.run([need("echoscu"), "-aet", aet, "-aec", aec, host, str(port)], capture_output=True,
                          text=True, timeout=60)

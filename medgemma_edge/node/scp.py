"""The DIMSE listener: a Storage SCP (with Verification) that files what it receives in the spool.

- Accepted: C-ECHO, and C-STORE of the SOP classes in STORAGE_CLASSES (what the runtime reads, and
  the non-image objects that travel with a study, kept so the worklist can say why they are
  skipped) in TRANSFER_SYNTAXES (those the runtime's decoders read). Other classes and syntaxes:
  the presentation context is rejected, so the sender learns at once and nothing is stored.
- With `allow` (`--dicom-allow AE@HOST`), an association whose calling AE title and address do not
  both match one entry is rejected (A-ASSOCIATE-RJ, "calling AE title not recognised") and
  `on_refused(calling AE, reason)` is called (the audit line). Host names in `allow` are resolved
  once, at start. The called AE title is not checked (as Orthanc's default): senders may call
  the node by any title.
- C-STORE: the dataset's bytes as sent go to `spool.put_new`; 0x0000 only once the instance is
  durably in the spool; 0xA700 (out of resources) when the spool or its disk is full, or the
  write failed; 0xC000 (cannot understand) for bytes the spool refuses. One log line, no patient
  value, no UID; the handler never raises. `on_instance` is called for an instance that is new
  (a resend of the same bytes is acknowledged again but not reported twice).
- pynetdicom logs association details at INFO and every DIMSE message (UIDs) at DEBUG, and some
  warnings quote UIDs: `quiet_pynetdicom` keeps its records out of the process's handlers and
  relays only warnings and errors, without quoted values or exception text.
- Each association runs in its own thread (pynetdicom's) and holds at most one instance in
  memory, as pynetdicom receives it whole before the handler runs.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from typing import Callable

from medgemma_edge.node.config import NodeConfig, Peer
from medgemma_edge.node.spool import Instance, Spool, SpoolFull
from medgemma_edge.runtime.dicom import offline  # noqa: F401 — before pydicom (see offline.py)
from medgemma_edge.runtime.errors import InputError

LOG = logging.getLogger("medgemma_edge.node.scp")

# Storage SOP classes (pynetdicom.sop_class names). Images: the modalities runtime/dicom/series.py
# reads (MODALITIES, less RT dose and segmentations, which it refuses as not pictures), plain and
# enhanced/legacy-converted multi-frame alike (frames are slices), and whole-slide microscopy (each
# instance one level of a tiled pyramid, read through OpenSlide as a slide, docs/wsi.md). The rest travel with studies from a
# PACS (reports, dose reports, key objects, presentation states): stored so that a whole-study
# push succeeds and the worklist lists them as skipped, with the reason.
IMAGE_CLASSES = (
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation", "DigitalMammographyXRayImageStorageForProcessing",
    "DigitalIntraOralXRayImageStorageForPresentation", "DigitalIntraOralXRayImageStorageForProcessing",
    "BreastTomosynthesisImageStorage",
    "CTImageStorage", "EnhancedCTImageStorage", "LegacyConvertedEnhancedCTImageStorage",
    "MRImageStorage", "EnhancedMRImageStorage", "EnhancedMRColorImageStorage",
    "LegacyConvertedEnhancedMRImageStorage",
    "UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage",
    "SecondaryCaptureImageStorage", "MultiFrameSingleBitSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage", "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameTrueColorSecondaryCaptureImageStorage",
    "XRayAngiographicImageStorage", "EnhancedXAImageStorage",
    "XRayRadiofluoroscopicImageStorage", "EnhancedXRFImageStorage",
    "NuclearMedicineImageStorage", "PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage",
    "LegacyConvertedEnhancedPETImageStorage", "RTImageStorage",
    "VLEndoscopicImageStorage", "VLMicroscopicImageStorage", "VLSlideCoordinatesMicroscopicImageStorage",
    "VLPhotographicImageStorage", "OphthalmicPhotography8BitImageStorage",
    "OphthalmicPhotography16BitImageStorage", "VLWholeSlideMicroscopyImageStorage",
)
COMPANION_CLASSES = (
    "BasicTextSRStorage", "EnhancedSRStorage", "ComprehensiveSRStorage", "Comprehensive3DSRStorage",
    "XRayRadiationDoseSRStorage", "EnhancedXRayRadiationDoseSRStorage",
    "RadiopharmaceuticalRadiationDoseSRStorage", "KeyObjectSelectionDocumentStorage",
    "GrayscaleSoftcopyPresentationStateStorage",
)
STORAGE_CLASSES = IMAGE_CLASSES + COMPANION_CLASSES

# Transfer syntaxes (pydicom.uid names) that pydicom, with the runtime's pylibjpeg plugins, decodes
# (tests/test_node_scp.py checks each has a decoder). Video, JPIP and JPEG 2000 Part 2 are refused.
TRANSFER_SYNTAXES = (
    "ImplicitVRLittleEndian", "ExplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian",
    "ExplicitVRBigEndian",
    "JPEGBaseline8Bit", "JPEGExtended12Bit", "JPEGLossless", "JPEGLosslessSV1",
    "JPEGLSLossless", "JPEGLSNearLossless",
    "JPEG2000Lossless", "JPEG2000",
    "HTJ2KLossless", "HTJ2KLosslessRPCL", "HTJ2K",
    "RLELossless",
)

MAX_ASSOCIATIONS = 24  # senders at once; a PACS pushing a study opens a few, ten modalities one each
MAX_PDU = 256 << 10  # offered receive PDU size: fewer, larger P-DATA PDUs than pynetdicom's 16 KiB
NETWORK_TIMEOUT_S = 60  # a sender silent this long mid-association is dropped (frees its thread)
_FULL_LOG_EVERY_S = 60  # a full spool refuses every instance; say so once a minute, not per instance

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised
_REJECT = (0x01, 0x01, 0x03)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


class DicomListener:
    def __init__(self, config: NodeConfig, spool: Spool, on_instance: Callable[[Instance], None],
                 on_refused: Callable[[str, str], None] | None = None):
        self.config = config
        self.spool = spool
        self.on_instance = on_instance
        self.on_refused = on_refused
        self._ae = None
        self._server = None
        self._allowed: list[tuple[str, set]] = []
        self._full_said = 0.0
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the OS's pick for port 0)."""
        if self._server is None:
            raise RuntimeError("the DICOM listener is not started")
        return int(self._server.server_address[1])

    def start(self) -> "DicomListener":
        from pynetdicom import AE, evt
        from pynetdicom import sop_class

        quiet_pynetdicom()
        self._allowed = [(peer.ae, _addresses(peer)) for peer in self.config.allow]
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.maximum_pdu_size = MAX_PDU
        ae.network_timeout = NETWORK_TIMEOUT_S
        ae.require_called_aet = False
        syntaxes = transfer_syntaxes()
        ae.add_supported_context(sop_class.Verification)
        for name in STORAGE_CLASSES:
            ae.add_supported_context(getattr(sop_class, name), syntaxes)
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store)]
        try:
            self._server = ae.start_server((self.config.host, self.config.port), block=False,
                                           evt_handlers=handlers)
        except OSError as err:
            raise InputError(f"cannot listen for DICOM on {self.config.host}:{self.config.port} "
                             f"({err.strerror or type(err).__name__}) — pick a free --dicom-port") from None
        self._ae = ae
        return self

    def stop(self) -> None:
        """Stop listening and end open associations (an unacknowledged instance is resent by its sender)."""
        ae, self._ae, self._server = self._ae, None, None
        if ae is not None:
            ae.shutdown()

    def __enter__(self) -> "DicomListener":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- handlers (pynetdicom's association threads) -------------------------------------------
    def _on_requested(self, event) -> None:
        try:
            calling = _calling_ae(event)
            address = str(event.assoc.requestor.address)
            if not self._allowed or self._is_allowed(calling, address):
                return
            reason = "calling AE title and address not in --dicom-allow"
            LOG.warning("DICOM association from AE %r at %s refused: %s", calling[:16], address, reason)
            _reject(event.assoc)
            self._tell_refused(calling, reason)
        except Exception as err:  # never into pynetdicom's thread: reject rather than let it in
            LOG.error("DICOM association check failed (%s); association refused", type(err).__name__)
            try:
                _reject(event.assoc)
            except Exception:
                event.assoc.abort()

    def _is_allowed(self, calling: str, address: str) -> bool:
        try:
            ip = _plain_ip(address)
        except ValueError:
            return False
        return any(calling == ae and ip in addresses for ae, addresses in self._allowed)

    def _tell_refused(self, calling: str, reason: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(calling, reason)
            except Exception as err:
                LOG.error("on_refused failed (%s)", type(err).__name__)

    def _on_store(self, event) -> int:
        """0x0000 only once the instance is in the spool; never raises."""
        calling = "?"
        try:
            calling = _calling_ae(event)
            inst, new = self.spool.put_new(event.encoded_dataset())
        except SpoolFull as err:
            self._say_full(calling, err)
            return OUT_OF_RESOURCES
        except InputError as err:  # spool/read errors: one line, no value from the dataset
            LOG.warning("C-STORE from AE %r refused (0x%04X): %s", calling[:16], CANNOT_UNDERSTAND, err)
            return CANNOT_UNDERSTAND
        except OSError as err:
            LOG.error("C-STORE from AE %r refused (0x%04X): the spool write failed (%s)", calling[:16],
                      OUT_OF_RESOURCES, err.strerror or type(err).__name__)
            return OUT_OF_RESOURCES
        except MemoryError:
            LOG.error("C-STORE from AE %r refused (0x%04X): out of memory", calling[:16], OUT_OF_RESOURCES)
            return OUT_OF_RESOURCES
        except Exception as err:  # a damaged dataset can raise anything; its text may quote values
            LOG.warning("C-STORE from AE %r refused (0x%04X): unreadable dataset (%s)", calling[:16],
                        CANNOT_UNDERSTAND, type(err).__name__)
            return CANNOT_UNDERSTAND
        if new:
            try:
                self.on_instance(inst)
            except Exception as err:  # stored is stored: the sender is told so
                LOG.error("on_instance failed (%s)", type(err).__name__)
        return SUCCESS

    def _say_full(self, calling: str, err: SpoolFull) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._full_said < _FULL_LOG_EVERY_S:
                return
            self._full_said = now
        LOG.warning("C-STORE from AE %r refused (0x%04X): %s", calling[:16], OUT_OF_RESOURCES, err)


def _reject(assoc) -> None:
    # As pynetdicom's own rejections do: the A-ASSOCIATE-RJ goes out, then the association waits
    # (its DUL thread) for the peer to close, so the peer reads a rejection, not a dropped link.
    assoc.acse.send_reject(*_REJECT)
    assoc.kill()


def transfer_syntaxes() -> list:
    import pydicom.uid

    return [getattr(pydicom.uid, name) for name in TRANSFER_SYNTAXES]


def _calling_ae(event) -> str:
    title = event.assoc.requestor.primitive.calling_ae_title
    if isinstance(title, bytes):
        title = title.decode("ascii", "replace")
    return str(title).strip()


def _plain_ip(address: str):
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _addresses(peer: Peer) -> set:
    """The addresses `peer.host` stands for (a name is resolved once, here)."""
    try:
        return {_plain_ip(peer.host)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(peer.host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        raise InputError(f"--dicom-allow {peer}: cannot resolve {peer.host!r:.60} — give its IP "
                         "address or fix the name") from None
    return {_plain_ip(info[4][0]) for info in infos}


# ---------------------------------------------------------------------------------------------
# pynetdicom's logging

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_UID_LIKE = re.compile(r"\b\d+(\.\d+){3,}\b")
_quiet_done = False


class _Relay(logging.Handler):
    """pynetdicom's warnings and errors, as one line each on our logger, without quoted values,
    UIDs or exception text (a decoding error can quote a dataset value)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.exc_info or isinstance(record.msg, BaseException):
                exc = record.exc_info[1] if record.exc_info else record.msg
                text = f"{type(exc).__name__} (details withheld)"
            else:
                lines = record.getMessage().strip().splitlines() or [""]
                text = _UID_LIKE.sub("<uid>", _QUOTED.sub("'…'", lines[0]))[:200]
            LOG.log(record.levelno, "pynetdicom: %s", text)
        except Exception:
            pass


def quiet_pynetdicom() -> None:
    """pynetdicom's records stop at its own logger: no DIMSE dumps (its standard handlers off, no
    identifiers logged), INFO and DEBUG dropped, warnings and errors relayed scrubbed (`_Relay`).
    Process-wide and idempotent; also for the node's SCU sends (outbox, dicomweb)."""
    global _quiet_done
    if _quiet_done:
        return
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logger = logging.getLogger("pynetdicom")
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(_Relay(logging.WARNING))
    _quiet_done = True

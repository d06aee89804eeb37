"""DICOM bytes looked at before a library is trusted with them (no pydicom here, so that
runtime/sources.py can ask "is this DICOM?" without paying pydicom's import).

    looks_like_dicom   the 'DICM' marker, or a bare dataset as old exports write it
    inflate            the deflated transfer syntax, bounded (pydicom inflates in one call)
    codestream_size    the frame size a JPEG, JPEG-LS or JPEG 2000 codestream declares itself:
                       its decoder allocates by that, whatever Rows and Columns say
"""

from __future__ import annotations

import struct
import zlib

from medgemma_edge.runtime.errors import InputError

# A deflated dataset is for small objects; no image we accept inflates past this, while a
# few MB of zeros inflate to GBs (the bound holds before the header inside can be read).
MAX_INFLATED_BYTES = 512 << 20
_CHUNK = 16 << 20  # inflate output per step: the bound is checked between steps

# Every VR of PS3.5 Table 6.2-1: an explicit-VR dataset shows one of these at bytes 4..5.
_VRS = {vr.encode() for vr in ("AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL "
                               "SQ SS ST SV TM UC UI UL UN UR US UT UV").split()}
# A dataset starts with its lowest group: file meta (0002), identification (0008), and in
# pared-down files patient, study or image groups; any other start is not DICOM.
_FIRST_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}


def looks_like_dicom(head: bytes) -> bool:
    """True for DICOM's 'DICM' at byte 128, or a bare dataset (no preamble, no file meta):
    a first tag in a leading group followed by a valid VR (explicit, either byte order) or a
    plausible length (implicit little endian). PNG, JPEG, TIFF, BMP, WebP and text never pass."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    for order in "<>":
        group, _ = struct.unpack(order + "HH", head[:4])
        if group in _FIRST_GROUPS and head[4:6] in _VRS:
            return True
    group, _, length = struct.unpack("<HHI", head[:8])
    return group in _FIRST_GROUPS and length < 0x10000


def inflate(zipped: bytes, name: str, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """The raw-deflate stream of a deflated DICOM dataset, refused once it passes `limit`."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pieces, total, data = [], 0, zipped
    while True:
        piece = inflater.decompress(data, _CHUNK)
        total += len(piece)
        if total > limit:
            raise InputError(f"{name}: the deflated data inflates to over {limit >> 20} MiB "
                             f"(decompression-bomb guard) — re-export it uncompressed or with "
                             f"an image codec (JPEG 2000, JPEG-LS, RLE)")
        pieces.append(piece)
        data = inflater.unconsumed_tail
        if inflater.eof or (not data and len(piece) < _CHUNK):
            break
    if not inflater.eof:
        raise InputError(f"{name}: the deflated data is truncated — copy it again from the "
                         f"PACS or re-export it")
    return b"".join(pieces)


# JPEG start-of-frame markers (ITU T.81 B.1.1.3: C0..CF except DHT C4, JPG C8, DAC CC) and
# JPEG-LS's SOF55 (F7); their segments all hold precision, lines, samples per line, components.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7}  # TEM, RSTn: no length


def codestream_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) a compressed frame declares, or None where its header cannot
    be read (or, for JPEG, where the height is left to a DNL marker)."""
    try:
        if frame[:2] == b"\xff\xd8":
            return _jpeg_size(frame)
        return _j2k_size(frame)
    except (IndexError, struct.error):
        return None


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    at = 2
    while True:
        while frame[at] == 0xFF and frame[at + 1] == 0xFF:  # fill bytes before a marker
            at += 1
        if frame[at] != 0xFF:
            return None
        marker = frame[at + 1]
        if marker in _STANDALONE:
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            return None
        if marker in _SOF:
            _, rows, columns, components = struct.unpack(">BHHB", frame[at + 4:at + 10])
            return (rows, columns, components) if rows else None
        at += 2 + struct.unpack(">H", frame[at + 2:at + 4])[0]


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    at = 0
    if frame[:8] == b"\x00\x00\x00\x0cjP  ":  # a JP2 file: find the codestream box
        at = 12
        while frame[at + 4:at + 8] != b"jp2c":
            length = struct.unpack(">I", frame[at:at + 4])[0]
            if length < 8:
                return None
            at += length
        at += 8
    if frame[at:at + 4] != b"\xff\x4f\xff\x51":  # SOC, then SIZ (ISO 15444-1 A.5.1)
        return None
    x, y, x0, y0 = struct.unpack(">IIII", frame[at + 8:at + 24])
    components = struct.unpack(">H", frame[at + 40:at + 42])[0]
    return (y - y0, x - x0, components) if x > x0 and y > y0 else None

"""A small GGUF reader for tests: metadata and tensor views of a file in well under a second.

gguf-py's GGUFReader builds an object per token string (262k of them) and takes ~25 s on a
2-core machine for one text GGUF; the tests only need keys, tensor types and data.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _NP:
                arr = np.frombuffer(self.buf, _NP[etype], count, self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        return self.take(_SCALARS[vtype])


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[str, tuple[int, ...], np.ndarray]]]:
    """(metadata, {tensor name: (GGML type name, numpy-order shape, raw data view)})."""
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    c = _Cursor(buf)
    assert c.take("<I") == 0x46554747, f"{path} is not a GGUF file"
    c.take("<I")  # version
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    kv = {}
    for _ in range(n_kv):
        key = c.string()
        kv[key] = c.value(c.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = [c.take("<Q") for _ in range(c.take("<I"))]
        infos.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(c.take("<I")), c.take("<Q")))
    align = kv.get("general.alignment", 32)
    start = (c.pos + align - 1) // align * align
    tensors = {}
    for name, shape, qtype, offset in infos:
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
        raw = buf[start + offset:start + offset + nbytes]
        data = raw.view(np.float32).reshape(shape) if qtype == gguf.GGMLQuantizationType.F32 else raw
        tensors[name] = (qtype.name, shape, data)
    return kv, tensors

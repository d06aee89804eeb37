"""What a GGUF file says about itself: its metadata and tensor list, read without llama.cpp or gguf-py.

`medgemma-edge import` and a `.gguf` given to `ask`/`serve`/`load()` check files that people
downloaded (llama.cpp's converter, community repositories, LM Studio, Ollama) before anything
runs. This reads the header only (never the tensor data) and treats the file as untrusted: every
count and length is bounded by the file's size, and a file that is not GGUF or is cut short is one
line naming it. Large arrays (token scores, merges) are skipped, except the token strings, which
give the special tokens' ids.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_edge.runtime.errors import BundleError

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 20
MAX_ARRAY = 1 << 26  # a vocabulary has ~262k entries
MAX_STRING = 64 << 20  # a chat template is a few KB; a key or a token a few bytes
READ_ARRAYS = ("tokenizer.ggml.tokens",)  # decoded; every other array is kept as its length only

# general.file_type (llama.cpp's llama_ftype) → the quant name people know
FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
              11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m",
              18: "q6_k", 19: "iq2_xxs", 20: "iq2_xs", 21: "q2_k_s", 22: "iq3_xs", 23: "iq3_xxs", 24: "iq1_s",
              25: "iq4_nl", 26: "iq3_s", 27: "iq3_m", 28: "iq2_s", 29: "iq2_m", 30: "iq4_xs", 31: "iq1_m",
              32: "bf16", 36: "tq1_0", 37: "tq2_0", 38: "mxfp4"}


@dataclass
class GGUFInfo:
    path: Path
    metadata: dict
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name → shape (GGUF order)
    _index: dict | None = field(default=None, repr=False)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def quant(self) -> str:
        """The file's quantization name (q4_k_m, f16, …), from general.file_type, else its name."""
        ftype = self.metadata.get("general.file_type")
        if isinstance(ftype, int) and ftype in FILE_TYPES:
            return FILE_TYPES[ftype]
        return quant_from_name(self.path.name) or "unknown"

    def token_id(self, spelled: str) -> int | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            return None
        if self._index is None:
            self._index = {t: i for i, t in enumerate(tokens)}
        return self._index.get(spelled)


def quant_from_name(name: str) -> str | None:
    """The quant a file's name spells (model-Q4_K_M.gguf → q4_k_m), if any."""
    stem = name.lower().removesuffix(".gguf")
    for q in sorted(set(FILE_TYPES.values()), key=len, reverse=True):
        for sep in ("-", "_", "."):
            if stem.endswith(sep + q) or f"{sep}{q}{sep}" in stem or f"{sep}{q}-" in stem:
                return q
    return None


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class _Reader:
    def __init__(self, f, size: int, name: str, arrays=READ_ARRAYS):
        self.f, self.size, self.name, self.arrays = f, size, name, arrays

    def need(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise BundleError(f"{self.name} ends inside its GGUF header — the file is incomplete; download or "
                              "copy it again")
        return data

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.need(struct.calcsize(fmt)))[0]

    def count(self, limit: int, what: str) -> int:
        n = self.scalar("<Q")
        if n > limit:
            raise BundleError(f"{self.name} claims {n} {what} — not a GGUF file this runtime can read; "
                              "download or convert it again")
        if n > self.size - self.f.tell():
            self.skip(n)  # the file ends before: says it is incomplete
        return n

    def string(self) -> str:
        n = self.count(MAX_STRING, "bytes in one string")
        try:
            return self.need(n).decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"{self.name} has a string that is not UTF-8 in its GGUF header — download or "
                              "convert it again") from None

    def value(self, vtype: int, key: str):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype = self.scalar("<I")
            n = self.count(MAX_ARRAY, "array entries")
            if key in self.arrays and etype == STRING:
                return [self.string() for _ in range(n)]
            if etype in _SCALARS and key not in ("clip.vision.image_mean", "clip.vision.image_std"):
                self.skip(n * struct.calcsize(_SCALARS[etype]))
                return ("array", n)
            return [self.value(etype, "") for _ in range(n)]
        if vtype not in _SCALARS:
            raise BundleError(f"{self.name} has a metadata value of unknown type {vtype} — not a GGUF file "
                              "this runtime can read")
        return self.scalar(_SCALARS[vtype])

    def skip(self, n: int) -> None:
        if self.f.tell() + n > self.size:
            raise BundleError(f"{self.name} ends inside its GGUF header — the file is incomplete; download or "
                              "copy it again")
        self.f.seek(n, 1)


def read_gguf_info(path, *, tensors: bool = True, tokens: bool = True) -> GGUFInfo:
    """The metadata (and, with tensors, every tensor's name and shape) of a GGUF file; BundleError
    with one line naming the file when it is not GGUF or is damaged."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except IsADirectoryError:
        raise BundleError(f"{name} is a folder, not a GGUF file") from None
    except OSError as err:
        raise BundleError(f"cannot read {name}: {err.strerror or err}") from None
    with f:
        head = f.read(4)
        if head != MAGIC:
            raise BundleError(f"{name} is not a GGUF file (it starts with {head[:4]!r}) — give a llama.cpp "
                              "GGUF model file (.gguf)")
        r = _Reader(f, size, name, READ_ARRAYS if tokens else ())
        version = r.scalar("<I")
        if version not in (2, 3):
            raise BundleError(f"{name} is GGUF version {version}; this runtime reads versions 2 and 3 — "
                              "convert it again with a current llama.cpp")
        n_tensors = r.count(MAX_TENSORS, "tensors")
        n_kv = r.count(MAX_KEYS, "metadata keys")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar("<I"), key)
        shapes = {}
        if tensors and tokens:
            for _ in range(n_tensors):
                tname = r.string()
                n_dims = r.scalar("<I")
                if n_dims > 8:
                    raise BundleError(f"{name} describes a tensor with {n_dims} dimensions — not a GGUF file "
                                      "this runtime can read")
                shapes[tname] = tuple(r.scalar("<Q") for _ in range(n_dims))
                r.skip(4 + 8)  # type, offset
    return GGUFInfo(path, metadata, shapes)

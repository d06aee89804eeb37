"""Write GGUF tensors straight from the checkpoint, a slice of rows at a time.

GGUFWriter.add_tensor keeps every array in memory until the file is written. Instead each
tensor's info (name, shape, type, byte size) is declared up front from the safetensors header,
then the data is produced slice by slice while it is written: peak memory is one slice
(~64 MiB) plus what the writer buffers, whatever the model's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from medgemma_edge.export.checkpoint import TensorRef, read_rows
from medgemma_edge.export.gguf_tensors import encode, map_name, storage_type, stored_nbytes, transform

SLICE_BYTES = 64 << 20  # float32 bytes converted per step


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order, as in the checkpoint
    qtype: gguf.GGMLQuantizationType
    kind: str  # transform kind
    source: TensorRef

    @property
    def nbytes(self) -> int:
        return stored_nbytes(self.shape, self.qtype)


def plan(tensors: dict[tuple[str, str], TensorRef], quant: str) -> list[PlannedTensor]:
    """GGUF name, type and transform for each checkpoint tensor, in GGUF name order."""
    out = []
    for (part, hf_name), ref in tensors.items():
        mapped = map_name(part, hf_name)
        out.append(PlannedTensor(mapped.gguf_name, ref.shape, storage_type(mapped.gguf_name, ref.shape, quant),
                                 mapped.kind, ref))
    return sorted(out, key=lambda t: _natural_key(t.name))


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.replace(".", " . ").split()]


class _StreamedTensor:
    """Looks like the ndarray `GGUFWriter.write_tensor_data` expects (nbytes, tofile), but reads,
    transforms and encodes its rows only while being written."""

    def __init__(self, t: PlannedTensor, progress):
        self.t, self.progress = t, progress
        self.nbytes = t.nbytes

    def tofile(self, fout) -> None:
        t = self.t
        rows = t.shape[0] if len(t.shape) > 1 else 1
        row_bytes = 4 * int(np.prod(t.shape)) // rows
        step = max(1, SLICE_BYTES // row_bytes)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            data = read_rows(t.source, start, stop) if len(t.shape) > 1 else read_rows(t.source)
            encode(transform(t.kind, data), t.qtype).tofile(fout)
            self.progress.update((stop - start) * row_bytes)


def write(writer: gguf.GGUFWriter, path: Path, planned: list[PlannedTensor], desc: str) -> None:
    """Declare every tensor, write header and metadata, then stream the data in order."""
    from tqdm import tqdm

    for t in planned:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(4 * int(np.prod(t.shape)) for t in planned)
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        for t in planned:
            writer.write_tensor_data(_StreamedTensor(t, bar))
    writer.close()

"""The token embedding table of an ONNX bundle, read row by row from memory-mapped .npy files.

    EmbeddingTable(folder: Path, info: dict)    # info: what export.onnx_decoder.write_embeddings returned
    .rows(ids: list[int]) -> np.ndarray float32 (n, hidden), raw rows (not × sqrt(hidden))

fp32 tables are one `[vocab, hidden]` float32 array; int8 tables are int8 rows with one float32
scale per row (row = int8 × scale). Memory-mapped, so a 262k × 2560 table costs only the pages of
the rows a prompt touches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgemma_edge.runtime.errors import BundleError, InputError


class EmbeddingTable:
    def __init__(self, folder, info: dict):
        folder = Path(folder)
        files = [folder / f for f in info["files"]]
        try:
            self._table = np.load(files[0], mmap_mode="r")
            self._scale = np.load(files[1], mmap_mode="r") if info["dtype"] == "int8_row" else None
        except (OSError, ValueError, IndexError) as err:
            raise BundleError(f"cannot read the embedding table {files[0].name} ({err}) — run "
                              "`medgemma-edge verify` on the bundle, or export it again") from None
        self.rows_n, self.hidden = self._table.shape
        if self._scale is not None and self._scale.shape != (self.rows_n,):
            raise BundleError(f"{files[1].name} has {self._scale.shape} scales for {self.rows_n} rows — "
                              "export the bundle again")

    def rows(self, ids) -> np.ndarray:
        idx = np.asarray(ids, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.rows_n):
            raise InputError(f"token id {int(idx.max() if idx.max() >= self.rows_n else idx.min())} is outside "
                             f"the embedding table of {self.rows_n} rows")
        out = np.asarray(self._table[idx], dtype=np.float32)  # (n, hidden)
        if self._scale is not None:
            out *= self._scale[idx][:, None]
        return out

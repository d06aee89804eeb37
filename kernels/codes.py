"""Every value an 8- or 16-bit integer dtype can hold, in the order its bits read as unsigned.

The table kernels (kernels/window.py, kernels/full_range.py) evaluate their
formula once per possible stored value and then map a picture with one gather, indexing the
table with the picture viewed as unsigned integers (free, even for signed data).
"""

from __future__ import annotations

import numpy as np


def every_code(dtype) -> np.ndarray:
    """(2**bits,) array of `dtype`: element k is the value whose bits, read unsigned, are k."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui" or dtype.itemsize > 2:
        raise ValueError(f"code tables exist for 8- and 16-bit integers, not {dtype}")
    return np.arange(1 << (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}").view(dtype)

"""Split one array operation into bands of rows (or columns, or the slices of a series) run on
threads.

Only for work that releases the GIL (Pillow's resample): the bands then run on separate cores.
Each band writes its own slice of a preallocated output, so the result is the same array the
single-threaded call would give.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MIN_ELEMENTS = 1 << 20  # below about a megapixel the hand-off costs more than a second core saves

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_in_band = threading.local()  # set on a band's thread: a band that bands again runs inline


def run_bands(fn, n: int, threads: int) -> None:
    """fn(start, stop) over `threads` contiguous, non-empty ranges covering 0..n."""
    edges = np.linspace(0, n, threads + 1).astype(int)
    ranges = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    if len(ranges) <= 1 or getattr(_in_band, "active", False):
        for a, b in ranges:  # (inline inside a band: waiting on the same pool could deadlock)
            fn(a, b)
        return
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="bands")
        pool = _POOLS[threads]

    def band(r):
        _in_band.active = True
        try:
            fn(*r)
        finally:
            _in_band.active = False

    list(pool.map(band, ranges))  # list() re-raises a band's error here


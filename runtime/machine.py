"""The one thread policy: every pool of the runtime (preprocessing bands, DICOM decode, onnxruntime,
llama.cpp, mtmd) takes the same `threads` value, from `--threads` / `load(threads=)`, by default
the machine's physical cores (hyper-threads share a core's vector units: they add contention, not
speed, to these loops)."""

from __future__ import annotations

import os


def physical_cores() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """`threads` as given (at least 1), or the physical cores when None / 0."""
    return max(1, int(threads)) if threads else physical_cores()

"""Resident memory of this process, as the stats and reports print it; giving freed heap back."""

import ctypes
import resource


def rss_mb() -> float | None:
    """Resident memory of this process now, in MiB (Linux's VmRSS); None where /proc has none."""
    return _status_mb("VmRSS:")


def trim_heap() -> bool:
    """Hand the heap pages glibc keeps after frees back to the system (malloc_trim(0)); False where
    there is no glibc. Large blocks (llama.cpp's KV cache, the mmap'd weights) go back when freed;
    what this returns are the many small ones of onnxruntime's and Python's arrays in between."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's VmHWM belongs to the address space and starts afresh at exec; ru_maxrss survives
    fork+exec, so a process started from a large parent (a test run holding models, a launcher)
    would be charged for the parent's pages.
    """
    peak = _status_mb("VmHWM:")
    return peak if peak is not None else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

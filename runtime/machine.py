"""The one thread policy: every pool of the runtime (preprocessing bands, DICOM decode, onnxruntime,
llama.cpp, mtmd) takes the same `threads` value, from `--threads` / `load(threads=)`, by default
the machine's physical cores (hyper-threads share a core's vector units: they add contention, not
speed, to these loops)."""

from __future__ import annotations

import os
import time


def physical_cores() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """`threads` as given (at least 1), or the physical cores when None / 0."""
    return max(1, int(threads)) if threads else physical_cores()


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have run (/proc/stat's first line), None where unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_busy_s() -> float:
    t = os.times()
    return t.user + t.system


class OthersLoad:
    """Cores other processes keep busy, measured between marks: the machine's busy CPU time
    (/proc/stat) minus this process's own (all its threads, llama.cpp's spinning ones included).

    Why: llama.cpp's worker threads spin while they wait for each other, so on a kiosk whose other
    programs hold a core, a decode on every core fights them and falls far below what one thread
    fewer would reach (`python -m benchmarks.bench_busy` measures both; benchmarks/results/REPORT.md)."""

    def __init__(self):
        self.mark()

    def mark(self) -> None:
        self._t, self._machine, self._own = time.monotonic(), _machine_busy_s(), _own_busy_s()

    def cores(self, min_window_s: float = 0.05) -> float | None:
        """Other processes' average cores since the last mark (None: unknown or too short a window);
        marks again when it measured."""
        machine, dt = _machine_busy_s(), time.monotonic() - self._t
        if machine is None or self._machine is None or dt < min_window_s:
            return None
        others = max(0.0, (machine - self._machine) - (_own_busy_s() - self._own)) / dt
        self.mark()
        return others


def threads_beside(others: float | None, wanted: int) -> int:
    """Threads to run beside `others` busy cores: no more than the cores they leave free (rounded,
    so a light background load takes nothing), never fewer than one."""
    if others is None:
        return wanted
    free = (os.cpu_count() or wanted) - others
    return max(1, min(wanted, int(free + 0.5)))

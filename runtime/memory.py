"""Peak resident memory of this process, as the stats and reports print it."""

import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's VmHWM belongs to the address space and starts afresh at exec; ru_maxrss survives
    fork+exec, so a process started from a large parent (a test run holding models, a launcher)
    would be charged for the parent's pages.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux

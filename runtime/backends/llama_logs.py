"""llama.cpp's log lines, for the whole project: one C callback, a Python handler that can be swapped.

llama.cpp and its mtmd library log every tensor at load and while quantizing, and a few warnings
per model; a user can act on none of that, but can on an error (a file that does not load, memory
that cannot be had). So by default error lines go to stderr and the rest is dropped; the export
swaps in a handler that turns per-tensor lines into a progress bar (`routed`).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

# ggml's levels (llama-cpp-python's _logger.py comment shows an older order): 1 debug, 2 info,
# 3 warn, 4 error, 5 continues the previous line.
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5


def errors_to_stderr(level: int, text: str) -> None:
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text)


_handler = errors_to_stderr
_last_level = [0]
_callback = None  # the ctypes callback object must outlive every call from C
_lock = threading.Lock()


def _on_log(level, text, user_data) -> None:
    if level != GGML_LOG_LEVEL_CONT:
        _last_level[0] = int(level)
    if text:
        _handler(_last_level[0], text.decode("utf-8", "replace"))


def install() -> None:
    """Route llama.cpp's and mtmd's logs through `_on_log` (once per process)."""
    global _callback
    with _lock:
        if _callback is not None:
            return
        import llama_cpp
        from llama_cpp import mtmd_cpp

        _callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_callback, None)
        mtmd_cpp.mtmd_log_set(_callback, None)


@contextmanager
def routed(handler):
    """Send each log line to `handler(level, text)` inside the block; errors to stderr again after."""
    global _handler
    install()
    previous, _handler = _handler, handler
    try:
        yield
    finally:
        _handler = previous

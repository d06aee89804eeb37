"""Route llama.cpp's log lines to a Python handler for the duration of a block.

llama.cpp logs every tensor while quantizing and a few warnings per model load; the export shows
progress bars instead, and keeps errors.
"""

from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager

# ggml's levels today (llama-cpp-python's _logger.py comment shows an older order): 1 debug,
# 2 info, 3 warn, 4 error, 5 continues the previous line.
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5


def errors_to_stderr(level: int, text: str) -> None:
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text)


@contextmanager
def llama_logs(handler=errors_to_stderr):
    """Send each llama.cpp log line to `handler(level, text)`; the previous callback is restored."""
    import llama_cpp

    prev_cb, prev_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_data))

    last = [0]

    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):
        if level != GGML_LOG_LEVEL_CONT:
            last[0] = int(level)
        if text:
            handler(last[0], text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(on_log, None)
    try:
        yield
    finally:
        llama_cpp.llama_log_set(prev_cb, prev_data)

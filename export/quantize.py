"""K-quants (q6_k, q5_k_m, q4_k_m) through llama.cpp's own quantizer.

gguf-py cannot write K-quants, and llama.cpp's quantizer also chooses the per-tensor mix that
defines "Q4_K_M" (more bits for attn_v / ffn_down in some layers, fallbacks for rows that are
not a multiple of 256), so the result matches what llama.cpp users know.
"""

from __future__ import annotations

import ctypes
import re
from contextlib import contextmanager
from pathlib import Path

from medgemma_edge.runtime.errors import ExportError

_FTYPE_NAMES = {"q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
_TENSOR_LINE = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")  # llama.cpp logs "[  12/ 236] name - ..."


@contextmanager
def _progress_from_log(desc: str):
    """tqdm bar fed by llama.cpp's per-tensor log lines (which are not shown themselves)."""
    from tqdm import tqdm

    from medgemma_edge.runtime.backends.llama_logs import errors_to_stderr, routed

    bar = tqdm(desc=desc, unit="tensor", leave=False)

    def on_log(level, text):
        m = _TENSOR_LINE.search(text)
        if m:
            bar.total = int(m.group(2))
            bar.update(int(m.group(1)) - bar.n)
        else:
            errors_to_stderr(level, text)

    try:
        with routed(on_log):
            yield
    finally:
        bar.close()


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 0) -> Path:
    """llama.cpp-quantize the GGUF `src` (F32/F16/BF16) into `dst` at a K-quant type."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError("K-quants need llama-cpp-python: pip install llama-cpp-python") from None
    if quant not in _FTYPE_NAMES:
        raise ExportError(f"{quant!r} is not a K-quant; choose one of {', '.join(_FTYPE_NAMES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPE_NAMES[quant])
    params.nthread = threads  # 0: all cores
    with _progress_from_log(f"text {quant}"):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp failed to quantize {src.name} to {quant} (code {rc}); "
                          "check free disk space, or export with --quant f16")
    return dst

"""A loaded model giving its memory back, and taking it again: `Model.unload()`, and the reopening
that the next call needing the model does first (`Model._serialized`), under the model's lock: a
caller just waits for it, and a caller holding the model is never unloaded under.

What goes: the text engine — llama.cpp's weights (an mmap of the GGUF: unmapped, so the pages leave
the process's resident set), its context and KV cache; or the ONNX decoder's sessions and cache —,
the vision encoder, and the in-memory image cache. What stays: the manifest, template and stop ids
(small), and the disk image cache with its saved prefixes, so a question after the reopening about
a prepared study still starts at the question. The reopening opens the same files with the same
settings (device, threads, context, KV cache type, LoRA files); it does not hash them again (that
was done at load; the CLI's `serve --idle-unload` uses this, docs/server.md#idle-unload).
"""

from __future__ import annotations

import threading

from medgemma_edge.runtime.errors import BusyError
from medgemma_edge.runtime.memory import trim_heap


def unload(model, wait: bool) -> bool:
    """Close what `model` holds in memory (module docstring). wait=False: only when no caller holds
    the model's lock now; True when the model is unloaded."""
    if model._holder == threading.get_ident():
        raise BusyError("this thread is still reading an answer of this model — finish or close that stream "
                        "before unloading it")
    if not model._lock.acquire(timeout=model.busy_wait_s if wait else 0):
        return False
    try:
        for part in (model._vision, model.engine):  # the vision encoder first: mtmd's refers to the text model
            if part is not None:
                part.close()
        model._vision = model.engine = None
        model.speculation.close()  # a draft model opens again with the next answer
        if model.image_cache is not None:
            model.image_cache.forget_memory()
    finally:
        model._lock.release()
    trim_heap()  # glibc keeps freed small blocks for the next malloc: handed back now (runtime/memory.py)
    return True


def reopen(model) -> None:
    """Open the text engine (and its LoRA files) again after `unload`; the caller holds the lock.
    The vision encoder opens with the first image not in the cache, as after a load."""
    model.loading = True
    try:
        engine = model._open_text().engine
        model.engine = engine
        try:
            model.loras = model._load_loras(model._lora_paths)
        except BaseException:  # never an engine without the adapters the model was loaded with
            model.engine = None
            engine.close()
            raise
    finally:
        model.loading = False

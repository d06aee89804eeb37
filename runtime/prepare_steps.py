"""Preparing a study in bounded steps, so that other work can go between them.

`Model.prepare` does a study's image work ahead of the question (runtime/prefill.py: the prompt
evaluated up to the end of its images, saved in the image cache). On a CPU that is minutes for a
CT series, and a question arriving meanwhile must wait at most one image encode, never the whole
series (the server's worker and the DICOM node run preparation as background work). So the work
is a generator of `PrepareStep`s, each `next()` holding the model's lock for one step only:

1. The first step renders the prompt (decode, window, resize, tokenize) and looks every image up
   in the image cache. A study whose prefix is saved already is one "skipped" step, the end.
2. "encode": one image not in the image cache per step; interleave=True (nothing of the model's
   state is in use between these steps).
3. "evaluate": the prompt up to the end of its images, one image block (with the text before
   it) per step, building up the engine's KV cache, which any other caller of the model replaces.
   Between blocks, when `should_pause()` says someone waits, the partial state is saved
   (engine.save_state) and the step says interleave=True; the next step restores it
   (engine.load_state) unless the engine still holds it. Otherwise the step says interleave=False:
   the caller must not let anyone else use the model before the next step. If someone does
   anyway, the next step sees what the engine still holds and evaluates again from there: slower,
   never wrong.
4. "saved": the last step evaluates the last block and saves the prefix exactly as `prepare` does
   (prefill.save_prefix: the same key, the same state). `Model.prepare` is this generator run to
   the end under one hold of the lock.

done/total count units of work: images to encode plus image blocks (blocks the engine already
held count as done when evaluation starts).

Memory: the study's embeddings are held from the lookup to the end (as `prepare` always held
them), so an image the memory cache evicted meanwhile (a series longer than its items) is never
encoded twice. A paused partial state is as large as the KV cache of the positions evaluated so
far (the saved prefix of those images: gigabytes for a long CT series on the 4B model, see the
prefix size per image in benchmarks/results/REPORT.md). It goes to the image cache's disk folder
under a key of its own (never a prepared prefix's key), deleted once restored and when the
preparation ends or is closed; only when there is no disk folder, or it would not fit there, is it
kept in memory until the next step. The ONNX engine offers the same save_state / load_state
(a .npz of its KV arrays), so both backends pause alike.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

from medgemma_edge.runtime import prefill
from medgemma_edge.runtime.reply import Stats

KINDS = ("encode", "evaluate", "saved", "skipped")


@dataclass
class PrepareStep:
    kind: str  # "encode" | "evaluate" | "saved" | "skipped" (prepared before, or no image: nothing to do)
    done: int  # units of work done: images encoded + image blocks evaluated
    total: int  # images to encode + image blocks
    interleave: bool  # True: the model's state is safe to hand to another caller now
    stats: Stats | None = None  # on the last step ("saved" or "skipped"): what `Model.prepare` returns


def prepare_steps(model, messages, *, think: bool, window, max_slices: int, fit, should_pause=None,
                  hold_lock: bool = True):
    """The steps (module docstring). hold_lock=False: the caller holds the model's lock already."""
    return _Preparation(model, messages, dict(think=think, window=window, max_slices=max_slices, fit=fit),
                        should_pause, model._serialized if hold_lock else nullcontext).run()


class _Preparation:
    def __init__(self, model, messages, options: dict, should_pause, locked):
        self.model, self.messages, self.options = model, messages, options
        self.should_pause = should_pause or (lambda: False)
        self.locked = locked
        self.stats = Stats(load_s=model.load_s)
        self.prompt: prefill.Prompt | None = None
        self.embeddings: dict = {}  # run index → embeddings
        self.to_encode: list[int] = []  # run indices not in the image cache
        self.encoded = 0
        self.pos: int | None = None  # positions of the prefix the engine holds for us (None: not started)
        self.partial = None  # (blob key or None, positions, bytes or None): a paused state
        self.encode_s = self.eval_s = 0.0
        self.evaluated = 0  # positions evaluated (again, after a disturbance: counted again)

    def run(self):
        try:
            while True:
                with self.locked():
                    step = self._advance()
                yield step
                if step.kind in ("saved", "skipped"):
                    return
        finally:
            self._drop_partial()

    @property
    def total(self) -> int:
        return self.encoded + len(self.to_encode) + len(self.prompt.runs)

    def _done(self) -> int:
        blocks = sum(e <= (self.pos or 0) for _, e in self.prompt.runs)
        return self.encoded + blocks

    # -- one step, under the lock ----------------------------------------------------------------
    def _advance(self) -> PrepareStep:
        if self.prompt is None:
            self._render()
            if self._prepared_before():
                return self._skipped()
            self._look_up()
        if self.to_encode:
            self._encode(self.to_encode.pop(0))
            return PrepareStep("encode", self._done(), self.total, True)
        if self.pos is None:  # evaluation starts: a question may have prepared the study meanwhile
            if self._prepared_before():
                return self._skipped()
            self.model.engine.reserve(self.prompt.image_prefix + 1, grow=self.model.auto_context)
        self._resume()
        end = self.prompt.image_prefix
        if self.pos < end:
            self._eval_next_block()
        if self.pos < end:
            paused = self.should_pause()
            if paused:
                self._save_partial()
            return PrepareStep("evaluate", self._done(), self.total, paused)
        prefill.save_prefix(self.model, self.prompt)
        self.stats.image_encode_s = round(self.encode_s, 3)
        self.stats.prefill_tok_s = round(self.evaluated / self.eval_s, 2) if self.eval_s > 0 and self.evaluated \
            else None
        return PrepareStep("saved", self._done(), self.total, True, self.stats)

    def _render(self) -> None:
        model, stats = self.model, self.stats
        self.prompt = prefill.render(model, self.messages, stats=stats, **self.options)
        stats.images, stats.prompt_tokens = len(self.prompt.views), len(self.prompt.ids)

    def _look_up(self) -> None:
        """Every image's embeddings from the image cache; the others are to encode."""
        t0 = time.perf_counter()
        for i, (s, _) in enumerate(self.prompt.runs):
            emb, _ = self.model.image_cache.get(self.prompt.keys[s][1])  # ("img", digest, 0)
            if emb is None:
                self.to_encode.append(i)
            else:
                self.embeddings[i] = emb
        self.encode_s += time.perf_counter() - t0
        self.stats.images_from_cache = len(self.prompt.runs) - len(self.to_encode)

    def _prepared_before(self) -> bool:
        end, cache = self.prompt.image_prefix, self.model.image_cache
        if end == 0:  # no image: nothing to prepare
            return True
        return cache.has_blob(prefill.prefix_key(self.model, self.prompt.keys[:end]))

    def _skipped(self) -> PrepareStep:
        self.stats.restored_tokens = self.prompt.image_prefix
        if self.encoded:
            self.stats.image_encode_s = round(self.encode_s, 3)
        self.to_encode.clear()
        self.pos = self.prompt.image_prefix
        return PrepareStep("skipped", self.total, self.total, True, self.stats)

    def _encode(self, i: int) -> None:
        t0 = time.perf_counter()
        _, self.embeddings[i], hit = self.model.embed(self.prompt.views[i])
        self.encode_s += time.perf_counter() - t0
        self.encoded += 1
        self.stats.images_from_cache += hit  # the same picture twice in one prompt: encoded once

    # -- evaluation -------------------------------------------------------------------------------
    def _resume(self) -> None:
        """Make the engine hold our prefix up to self.pos again, or learn how much of it it holds."""
        end = self.prompt.image_prefix
        kept = prefill.held(self.model, self.prompt, stop=end)
        if self.pos is None:  # the first evaluation step: whatever the engine holds of the prompt serves
            self.stats.reused_tokens = self.pos = kept
            return
        if kept < self.pos and self.partial is not None:
            key, n, data = self.partial
            data = data if key is None else self.model.image_cache.get_blob(key)
            if n == self.pos and data is not None and self.model.engine.load_state(data, self.prompt.keys[:n]):
                kept = n
            else:  # lost or refused: evaluate again from what the engine holds
                kept = prefill.held(self.model, self.prompt, stop=end)
        self._drop_partial()
        self.pos = kept

    def _eval_next_block(self) -> None:
        i = next(i for i, (_, e) in enumerate(self.prompt.runs) if e > self.pos)
        t0 = time.perf_counter()
        end = prefill.eval_block(self.model, self.prompt, self.pos, i, self.embeddings[i])
        self.eval_s += time.perf_counter() - t0
        self.evaluated += end - self.pos
        self.pos = end

    def _save_partial(self) -> None:
        model, n = self.model, self.pos
        data = model.engine.save_state()
        cache = model.image_cache
        if cache.dir is not None:
            # its own key: never the name of a prepared prefix, which a shorter study may share
            key = prefill.prefix_key(model, self.prompt.keys[:n]) + ".partial"
            cache.put_blob(key, data)
            if cache.has_blob(key):  # a full disk, or larger than the cache: kept in memory instead
                self.partial = (key, n, None)
                return
        self.partial = (None, n, data)

    def _drop_partial(self) -> None:
        if self.partial is not None and self.partial[0] is not None:
            self.model.image_cache.drop_blob(self.partial[0])
        self.partial = None

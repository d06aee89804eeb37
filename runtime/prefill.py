"""Getting a chat's prompt into the KV cache with as little work as possible.

Four steps, each named: render (messages → token ids with image slots, by the bundle's chat
template (runtime/chat_template.py), and the 896² views that fill them), reuse (keep what the
cache already holds of this prompt, or restore a saved prefix from disk), encode (only the images
whose blocks still need evaluating; the embedding cache answers the rest), evaluate (the missing
positions, images as embedding blocks).

Persistent prefixes: a clinician asks about a study minutes or days after it was prepared. The
expensive part of that first question is everything up to the end of the study's images (system
prompt, images, slice labels): the vision encoder and the image prefill. After evaluating it, the
sequence state (llama.cpp's KV cache for it) is saved in the image cache's disk folder, keyed by
the text model's sha256, the KV cache type (--kv-cache) and the exact prefix (token ids and image
digests); a later question, in a new process, restores it and evaluates only the question. A
prefix saved by another bundle, with another cache type or another system prompt has another key
and is never used (llama.cpp would refuse a state of another cache type anyway: load_state False).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from medgemma_edge.runtime import chat as chatfmt
from medgemma_edge.runtime.embed_cache import pixel_digest
from medgemma_edge.runtime.engines import DEFAULT_KV_CACHE
from medgemma_edge.runtime.errors import BundleError
from medgemma_edge.runtime.preprocess import model_view
from medgemma_edge.runtime.progress import Meter, finished
from medgemma_edge.runtime.reply import Stats
from medgemma_edge.runtime.sources import load_pictures


@dataclass
class Prompt:
    ids: list[int]  # the rendered prompt's token ids
    runs: list[tuple[int, int]]  # [start, end) of each image's soft-token run in ids
    views: list[np.ndarray]  # one S×S×3 uint8 view per image, in prompt order
    keys: list  # one per position: a token id, or ("img", digest, j) inside an image block
    sizes: list[list[tuple[int, int]]]  # per image item: the (H, W) of each picture it decoded to (boxes)

    @property
    def image_prefix(self) -> int:
        """Positions up to the end of the last image block (0 without images): what is saved."""
        return self.runs[-1][1] if self.runs else 0


def render(model, messages, *, think: bool, window, max_slices, fit, stats: Stats) -> Prompt:
    """Messages → token ids with image slots, and the views that fill them."""
    t0 = time.perf_counter()
    sizes = []

    def loader(src):  # the one decode of each image item; its sizes map box_2d answers back (runtime/boxes)
        pictures = load_pictures(src, window=window, max_slices=max_slices)
        sizes.append([p.pixels.shape[:2] for p in pictures])
        return pictures

    expanded, slots = chatfmt.expand_images(messages, loader)
    views = []
    if slots:
        model.require_vision()  # a text-only bundle refuses images here, before any work
        views = list(model_view([s.pixels for s in slots], model.image_size, fit or model.fit,
                                threads=model.threads))
    stats.preprocess_ms = round((time.perf_counter() - t0) * 1000, 2)
    parts = model.template.parts(expanded, image_tokens=model.image_tokens, think=think)  # the bundle's template
    ids = chatfmt.tokenize_prompt(parts, model.engine.tokenize)
    runs = _image_runs(ids, model.image_token_id) if model.image_token_id is not None else []
    if len(runs) != len(views) or any(e - s != model.image_tokens for s, e in runs):
        raise BundleError("the prompt's image slots do not match the images — the bundle's tokenizer "
                          "lacks <image_soft_token>; export the bundle again")
    keys = list(ids)
    for (s, e), view in zip(runs, views):
        digest = pixel_digest(view)
        keys[s:e] = [("img", digest, j) for j in range(e - s)]
    return Prompt(ids, runs, views, keys, sizes)


def prefix_key(model, keys: list) -> str:
    """The disk name of an evaluated prefix: this text model, its KV cache type and exactly these
    positions."""
    h = hashlib.sha256(model.text_id.encode())
    if model.kv_cache != DEFAULT_KV_CACHE:  # a q8_0 state is never offered to an f16 context, nor back;
        h.update(f"kv_cache={model.kv_cache}".encode())  # f16 keys stay those saved before the option
    h.update(repr(keys).encode())
    return h.hexdigest()


def held(model, prompt: Prompt, stop: int | None = None) -> int:
    """Positions of `prompt` (at most `stop`) that the engine still holds, never ending inside an
    image block; the engine's tail beyond them is dropped."""
    engine = model.engine
    keep = engine.sync_prefix(prompt.keys)
    for s, e in prompt.runs:  # an image block is evaluated whole or not at all
        if s < keep < e:
            keep = engine.truncate(s)
    if stop is not None and keep > stop:
        keep = engine.truncate(stop)
    return keep


def reuse(model, prompt: Prompt, stats: Stats) -> int:
    """Positions of `prompt` already in the cache: the in-memory prefix, or one restored from disk."""
    engine = model.engine
    keep = held(model, prompt)
    end = prompt.image_prefix
    if keep < end and model.image_cache is not None:
        data = model.image_cache.get_blob(prefix_key(model, prompt.keys[:end]))
        if data is not None and engine.load_state(data, prompt.keys[:end]):
            keep = end
            stats.restored_tokens = end
    return keep


def encode(model, prompt: Prompt, keep: int, stats: Stats):
    """Embeddings of the images whose blocks start at or after `keep`, by run index: the return value
    of this generator, which yields Progress ("images") before the first and after each image."""
    t0 = time.perf_counter()
    needed = [i for i, (s, _) in enumerate(prompt.runs) if s >= keep]
    found = {}  # run index → (digest, embeddings, from_cache)
    meter = Meter("images", len(needed), model.encode_speed.seconds())
    if needed:
        yield meter.at(0)
    for done, i in enumerate(needed, 1):
        found[i] = model.embed(prompt.views[i])
        yield meter.at(done)
    stats.images = len(prompt.views)
    stats.images_from_cache = len(prompt.views) - len(needed) + sum(hit for _, _, hit in found.values())
    stats.image_encode_s = round(time.perf_counter() - t0, 3)
    return {i: emb for i, (_, emb, _) in found.items()}


def eval_block(model, prompt: Prompt, pos: int, i: int, emb: np.ndarray) -> int:
    """Evaluate the text from `pos` up to image block i, then the block; return the block's end."""
    s, e = prompt.runs[i]
    if pos < s:
        model.engine.eval_tokens(prompt.ids[pos:s])
    model.engine.eval_embeddings(emb, prompt.keys[s:e])
    return e


def save_prefix(model, prompt: Prompt) -> None:
    """Save the evaluated image prefix (the engine holds exactly it) in the image cache's disk
    folder, unless it is there already; nothing without a disk folder."""
    cache = model.image_cache
    if cache is None or cache.dir is None:
        return
    key = prefix_key(model, prompt.keys[:prompt.image_prefix])
    if not cache.has_blob(key):
        cache.put_blob(key, model.engine.save_state())


def evaluate(model, prompt: Prompt, keep: int, embeddings: dict, stats: Stats):
    """Evaluate positions keep.. of the prompt, saving the image prefix to disk when this call
    evaluated it. A generator: when image blocks are evaluated, it yields Progress ("prompt",
    positions of keep.. done) before the first block, after each block and at the end."""
    ids = prompt.ids
    t0 = time.perf_counter()
    pos = keep
    meter = Meter("prompt", len(ids) - keep) if keep < prompt.image_prefix else None
    if meter is not None:
        yield meter.at(0)
    for i, (s, e) in enumerate(prompt.runs):
        if e > pos:
            pos = eval_block(model, prompt, pos, i, embeddings[i])
            if meter is not None:
                yield meter.at(pos - keep)
    if keep < prompt.image_prefix:
        save_prefix(model, prompt)
    if pos < len(ids):
        model.engine.eval_tokens(ids[pos:])
        if meter is not None:
            yield meter.at(len(ids) - keep)
    dt = time.perf_counter() - t0
    stats.prompt_tokens, stats.reused_tokens = len(ids), keep
    stats.prefill_tok_s = round((len(ids) - keep) / dt, 2) if dt > 0 and len(ids) > keep else None


def prefill_steps(model, messages, *, think, window, max_slices, fit, stats: Stats, reserve: int = 1):
    """All four steps, as a generator of Progress items (runtime/progress.py) whose return value is
    the Prompt. (Preparing a study, which stops after the image prefix, is runtime/prepare_steps.py,
    on the same helpers.)"""
    prompt = render(model, messages, think=think, window=window, max_slices=max_slices, fit=fit, stats=stats)
    model.engine.reserve(len(prompt.ids) + reserve, grow=model.auto_context)
    keep = reuse(model, prompt, stats)
    embeddings = yield from encode(model, prompt, keep, stats)
    yield from evaluate(model, prompt, keep, embeddings, stats)
    return prompt


def prefill(model, messages, **options) -> Prompt:
    """`prefill_steps` run to the end, its progress unseen."""
    return finished(prefill_steps(model, messages, **options))


def _image_runs(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == image_id:
            j = i
            while j < len(ids) and ids[j] == image_id:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs

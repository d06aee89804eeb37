"""`medgemma_edge.load(bundle_dir)` → `Model`: the one loading path for the CLI, the server and the tests."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np

from medgemma_edge.runtime import chat as chatfmt
from medgemma_edge.runtime.chat_template import ChatTemplate
from medgemma_edge.runtime import constrain
from medgemma_edge.runtime import generate as gen
from medgemma_edge.runtime import prefill
from medgemma_edge.runtime import spec_choice
from medgemma_edge.runtime.boxes import answer_boxes
from medgemma_edge.runtime.budget import EncodeSpeed
from medgemma_edge.runtime.cache import cache_root
from medgemma_edge.runtime.engines import DEFAULT_KV_CACHE, check_backend, check_kv_cache, open_engine
from medgemma_edge.runtime.embed_cache import DEFAULT_DISK_MB, DEFAULT_MEMORY_ITEMS, EmbeddingCache, pixel_digest
from medgemma_edge.runtime.errors import BundleError, BusyError, InputError
from medgemma_edge.runtime.files import file_id
from medgemma_edge.runtime.json_close import close_cut_answer
from medgemma_edge.runtime.machine import OthersLoad, resolve_threads, threads_beside
from medgemma_edge.runtime.memory import peak_rss_mb
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES
from medgemma_edge.runtime.prepare_steps import prepare_steps
from medgemma_edge.runtime.preprocess import DEFAULT_FIT, IMAGE_SIZE
from medgemma_edge.runtime.progress import finished
from medgemma_edge.runtime.reply import Reply, Response, Stats
from medgemma_edge.runtime.residency import reopen, unload
from medgemma_edge.runtime.vision_choice import choose_vision

AUTO_CONTEXT_START = 4096
VERIFIED_FILES = "verified-bundle-files.json"  # in the cache folder: files hashed once, by size+mtime+inode
BUSY_WAIT_S = 600.0  # how long a caller waits for another caller's answer before a BusyError
REFIT_TOKENS = 16  # decode steps between looks at the other programs' CPU use


def load(bundle_dir, device: str = "auto", threads: int | None = None, context: int | None = None,
         fit: str = DEFAULT_FIT, image_cache_dir=None, image_cache_mb: float = DEFAULT_DISK_MB,
         vision: str = "auto", repack="auto", lora=(), mmproj=None, kv_cache: str = DEFAULT_KV_CACHE,
         speculative: str = "auto", draft_model=None) -> "Model":
    """Read and check the bundle's manifest, then build the backend it names.

    bundle_dir: a bundle folder (`medgemma-edge export` or `import`), or a GGUF people already have:
    a text .gguf with `mmproj` its projector .gguf (text only without it), or "ollama:NAME[:TAG]";
    those are checked and described in memory as `import` would (runtime/gguf_import.py).

    threads: one value for every pool (llama.cpp, the vision encoder, preprocessing, DICOM);
    default the physical cores.
    context=None grows the context to what each prompt needs (a CT series of 85 slices needs
    ~23k tokens) up to the model's training length; a number fixes it.
    image_cache_dir: also keep image embeddings on disk there (bounded by image_cache_mb), so the
    same image is not encoded again after a restart; off by default (see runtime/embed_cache).
    vision: which of the bundle's vision files runs — "auto" (the fastest faithful one on this
    machine, runtime/vision_choice.py) or an encoding the bundle holds ("f16", "onnx-int8", …). A named
    file this CPU cannot run faithfully (onnx-int8-vnni without VNNI) is refused here, InputError; with
    "auto" and no such file, the model loads, answers text, and refuses images with that one line.
    repack: True: llama.cpp repacks the text weights for this CPU's kernels (faster decode on AVX-512),
    the file read without mmap (weights held once, not shared through the page cache); False: mmapped
    as is; "auto": True only on CPU kinds measured to gain at the same memory (runtime/repack_choice.py).
    lora: llama.cpp LoRA files (`export SRC --adapter DIR --lora-out FILE`) applied to the text model
    at load; each must be made from this bundle's base checkpoint (GGUF bundles only).
    kv_cache: the KV cache's type, "f16" or "q8_0" (runtime/engines.KV_CACHES; q8_0 turns on llama.cpp's
    flash attention, GGUF bundles only); a prefix saved with one type is never restored into the other.
    speculative: "auto", "on" or "off" — guessed tokens checked in batches, the same answer sooner where
    guesses hit; draft_model: a small GGUF sharing the vocabulary that guesses too (runtime/spec_choice.py).
    """
    from medgemma_edge.runtime.gguf_import import open_model_files

    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {device!r:.40} — use auto, cpu or cuda")
    for name, value, least in (("threads", threads, 1), ("context", context, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise InputError(f"{name} must be a positive integer or None, got {value!r:.40}")
    _check_image_options(False, 1, fit)
    if not isinstance(vision, str):
        raise InputError(f"vision must be 'auto' or an encoding name, got {type(vision).__name__}")
    lora = [lora] if isinstance(lora, (str, os.PathLike)) else list(lora or ())
    if not all(isinstance(p, (str, os.PathLike)) for p in lora):
        raise InputError("lora must be a LoRA file path or a list of them")
    if not isinstance(bundle_dir, (str, os.PathLike)):
        raise InputError(f"bundle_dir must be a folder path, got {type(bundle_dir).__name__}")
    if mmproj is not None and not isinstance(mmproj, (str, os.PathLike)):
        raise InputError(f"mmproj must be a .gguf file path, got {type(mmproj).__name__}")
    # BundleError: missing, unreadable, incomplete or damaged copy. Hashed on the first load only.
    try:
        remember = cache_root() / VERIFIED_FILES
    except OSError:  # no writable cache folder: every load hashes
        remember = None
    bundle, manifest = open_model_files(bundle_dir, mmproj, remember=remember)
    backend = check_backend(bundle, manifest)
    check_kv_cache(kv_cache, backend)
    speculative = spec_choice.wanted(speculative, draft_model, backend, size=spec_choice.size_class(bundle, manifest))
    return Model(bundle, manifest, device=device, threads=threads, context=context, fit=fit,
                 image_cache_dir=image_cache_dir, image_cache_mb=image_cache_mb, vision=vision, repack=repack,
                 lora=lora, kv_cache=kv_cache, speculative=speculative, draft_model=draft_model)


class Model:
    def __init__(self, bundle: Path, manifest: dict, *, device: str, threads, context: int | None, fit: str,
                 image_cache_dir=None, image_cache_mb: float = DEFAULT_DISK_MB, vision: str = "auto",
                 repack="auto", lora=(), kv_cache: str = DEFAULT_KV_CACHE, speculative=frozenset(),
                 draft_model=None):
        t0 = time.perf_counter()
        self.bundle, self.manifest, self.fit, self.device = bundle, manifest, fit, device
        self.in_memory = any(Path(f["path"]).is_absolute() for f in manifest["files"])  # a .gguf opened directly
        self._manifest_sha = None
        self.threads = resolve_threads(threads)
        text = next(f for f in manifest["files"] if f["role"] == "text")
        self.auto_context = context is None
        # kept: `unload` closes the engine and the next call opens it again the same way (runtime/residency.py)
        self._open_text = partial(open_engine, bundle, manifest, device=device, threads=self.threads,
                                  n_ctx=context or AUTO_CONTEXT_START, repack=repack, kv_cache=kv_cache,
                                  flash_attn=True if speculative else None)  # why: runtime/spec_choice.py
        opened = self._open_text()
        self.engine = opened.engine
        self.speculation = spec_choice.Speculation.open(speculative, draft_model, self.engine, self.threads)
        self.loading = False  # the engine is being opened again after `unload`
        self.kv_cache = kv_cache  # part of a saved prefix's key (runtime/prefill.prefix_key)
        self.vocab = chatfmt.vocabulary(self.engine, manifest)
        self.text_id = text.get("sha256") or file_id(bundle / text["path"])
        if manifest["backend"] == "onnx":  # the graph file is small; its weights live beside it
            self.text_id = hashlib.sha256(" ".join(f["sha256"] for f in manifest["files"] if f["role"] in
                                                   ("text", "text_data", "embeddings")).encode()).hexdigest()
        self._lora_paths = lora
        self.loras = self._load_loras(lora)
        if self.loras:  # saved prefixes (KV states) of the plain model must not serve the adapted one
            ids = [self.text_id] + [file_id(Path(p)) for p in lora]
            self.text_id = hashlib.sha256(" ".join(ids).encode()).hexdigest()
        try:
            speeds = cache_root()
        except OSError:  # no cache folder: speeds are not remembered
            speeds = None
        speed_of = lambda e: EncodeSpeed(speeds, e.get("sha256") or e["path"], self.threads)
        self.no_vision = None  # why images are refused though the bundle has vision files
        try:
            self.vision_file = choose_vision([f for f in manifest["files"] if f["role"] == "vision"], vision,
                                             gpu=opened.gpu, measured=lambda e: speed_of(e).best())
        except InputError as err:
            if vision != "auto":  # a file named by the caller that cannot run faithfully here: refused now
                raise
            # auto, and no file runs faithfully on this CPU: text questions still work, images get this line
            self.vision_file, self.no_vision = None, str(err)
        self.vision_path = bundle / self.vision_file["path"] if self.vision_file else None
        self._vision = None
        image = manifest.get("image") or {}
        self.image_size = int(image.get("size", IMAGE_SIZE))
        self.image_tokens = int(image.get("tokens_per_image", chatfmt.IMAGE_TOKENS))
        self.template = ChatTemplate.from_manifest(manifest)  # the bundle's chat template (runtime/chat_template.py)
        self.image_token_id = (manifest.get("special_tokens") or {}).get("image_soft_token")  # None: text-only
        self.demo_notice = manifest.get("demo_notice")
        self.image_cache = None
        self.encode_speed = EncodeSpeed(None, "", self.threads)
        if self.vision_path is not None:
            vision_id = self.vision_file.get("sha256") or file_id(self.vision_path)
            self.encode_speed = EncodeSpeed(speeds, vision_id, self.threads)
            self.image_cache = EmbeddingCache((self.image_tokens, self.engine.n_embd), vision_id,
                                              memory_items=DEFAULT_MEMORY_ITEMS, disk_dir=image_cache_dir,
                                              disk_mb=image_cache_mb)
        # One llama.cpp context serves one caller at a time (two in llama_decode at once crash):
        # every entry point below holds this lock; others wait for it, or get a BusyError.
        self._lock = threading.Lock()
        self._holder: int | None = None
        self.busy_wait_s = BUSY_WAIT_S
        self.others_load = OthersLoad()  # other programs' CPU use, measured between our steps
        self.load_s = round(time.perf_counter() - t0, 3)

    def _load_loras(self, paths) -> list[dict]:
        if not paths:
            return []
        if not hasattr(self.engine, "load_loras"):
            raise InputError(f"LoRA files apply to GGUF bundles only; {self.bundle.name} is "
                             f"'{self.manifest['backend']}' — export the adapter merged (export --adapter)")
        return self.engine.load_loras(paths, (self.manifest.get("source") or {}).get("config_sha256"))

    @contextmanager
    def _serialized(self):
        if self._holder == threading.get_ident():
            raise BusyError("this thread is still reading an earlier answer of this model — finish or "
                            "close that stream before asking again")
        if not self._lock.acquire(timeout=self.busy_wait_s):
            raise BusyError(f"the model stayed busy with another request for {self.busy_wait_s:.0f} s — "
                            "ask again later")
        self._holder = threading.get_ident()
        try:
            if self.engine is None:  # unloaded: opened again first, the caller waits for it
                reopen(self)
            yield
        finally:
            self._holder = None
            self._lock.release()

    # -- memory --------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.engine is not None

    def unload(self, *, wait: bool = True) -> bool:
        """Give the model's memory back (runtime/residency.py): the text engine, its KV cache, the
        vision encoder and the in-memory image cache; the disk image cache stays. The next call that
        needs the model opens them again and waits for that. wait=False: only if no caller holds the
        model now. True when it is unloaded."""
        return unload(self, wait)

    # -- images --------------------------------------------------------------------------------
    def require_vision(self) -> None:
        if self.vision_path is None:
            raise InputError(self.no_vision or self._text_only())

    def _text_only(self) -> str:
        source = self.manifest.get("source") or {}
        if source.get("kind") != "imported":
            return "this bundle is text-only and cannot take images — ask without --image, or export a multimodal checkpoint"
        from medgemma_edge.runtime.gguf_check import ADD_MMPROJ

        if not self.in_memory:
            return (f"this bundle was imported without a vision projector and cannot take images — import "
                    f"{source.get('path_name')} again with --mmproj, or ask without --image")
        return f"{source.get('path_name')} has no vision — {ADD_MMPROJ}"

    @property
    def manifest_sha256(self) -> str:
        """The manifest's sha256 (it pins every file's): manifest.json's bytes, or for a GGUF opened
        directly the canonical JSON of its in-memory manifest."""
        if self._manifest_sha is None:
            path = self.bundle / "manifest.json"
            data = path.read_bytes() if path.is_file() and not self.in_memory else \
                json.dumps(self.manifest, sort_keys=True).encode()
            self._manifest_sha = hashlib.sha256(data).hexdigest()
        return self._manifest_sha

    def load_vision(self):
        """The vision encoder, opened now (it is otherwise opened by the first image not in the cache)."""
        if self._vision is None:
            self.require_vision()
            from medgemma_edge.runtime.backends import open_vision

            # llama.cpp's mtmd needs the text model; an ONNX bundle's engine has none (and ONNX vision)
            self._vision = open_vision(self.vision_path, getattr(self.engine, "model", None), self.engine.n_embd,
                                       self.threads, self.device, self.manifest.get("image"))
        return self._vision

    def image_embeddings(self, view: np.ndarray) -> tuple[str, np.ndarray, bool]:
        """(digest, embeddings (tokens, n_embd), from_cache) for one S×S×3 uint8 view."""
        with self._serialized():
            return self.embed(view)

    def embed(self, view: np.ndarray) -> tuple[str, np.ndarray, bool]:
        """image_embeddings without taking the model's lock (for code already holding it)."""
        self.require_vision()
        digest = pixel_digest(view)
        emb, _ = self.image_cache.get(digest)
        if emb is not None:  # the vision file is not even loaded for a cached image
            return digest, emb, True
        encoder = self.load_vision()
        t0 = time.perf_counter()
        emb = encoder.encode(view)
        self.encode_speed.record(time.perf_counter() - t0)
        if emb.shape[0] != self.image_tokens:
            raise BundleError(f"the vision file gave {emb.shape[0]} tokens per image, the manifest says "
                              f"{self.image_tokens} — export the bundle again")
        self.image_cache.put(digest, emb)
        return digest, emb, False

    def prepare(self, messages, *, think: bool = False, window=None, max_slices: int = DEFAULT_MAX_SLICES,
                fit: str | None = None) -> Stats:
        """Do the image work of `messages` ahead of the question: decode, window, resize, encode every
        image into the image cache and evaluate the prompt up to the end of the images; with a disk
        image cache that evaluated prefix is saved too, so a later question about the same study,
        with the same system prompt, in any process, starts at the question (runtime/prefill.py).
        `prepare_steps` run to the end under one hold of the model's lock."""
        _check_image_options(think, max_slices, fit, window)
        with self._serialized():
            for step in prepare_steps(self, messages, think=think, window=window, max_slices=max_slices, fit=fit,
                                      hold_lock=False):
                pass
        return step.stats

    def prepare_steps(self, messages, *, think: bool = False, window=None, max_slices: int = DEFAULT_MAX_SLICES,
                      fit: str | None = None, should_pause=None):
        """`prepare` as a generator of `PrepareStep`s, each doing at most one image encode or one image
        block's evaluation while it holds the model's lock, so other callers can go between steps
        (runtime/prepare_steps.py). should_pause(): someone waits for the model; between blocks the
        partial state is then saved and the step says interleave=True. Without it (or while it says
        False) a step may say interleave=False: let no one else use the model before the next step."""
        _check_image_options(think, max_slices, fit, window)
        if should_pause is not None and not callable(should_pause):
            raise InputError(f"should_pause must be a callable or None, got {type(should_pause).__name__}")
        return prepare_steps(self, messages, think=think, window=window, max_slices=max_slices, fit=fit,
                             should_pause=should_pause)

    # -- answers -------------------------------------------------------------------------------
    def next_token_logits(self, messages, *, think: bool = False, window=None,
                          max_slices: int = DEFAULT_MAX_SLICES, fit: str | None = None) -> np.ndarray:
        """Logits (vocab,) for the first token of the model's reply, as float32."""
        _check_image_options(think, max_slices, fit, window)
        with self._serialized():
            prefill.prefill(self, messages, think=think, window=window, max_slices=max_slices, fit=fit,
                            stats=Stats())
            return self.engine.logits().copy()

    def stream(self, messages, max_new_tokens: int = gen.DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=(), think: bool = False, *,
               window=None, max_slices: int = DEFAULT_MAX_SLICES, fit: str | None = None, json_schema=None,
               grammar: str | None = None, repetition_guard: bool = True, progress: bool = False):
        """Answer a chat as it is generated: yields `Response`s (text piece, token id); the last one
        carries finish_reason, the thought (if the model thought) and the stats. progress=True: before
        the first Response, also `Progress` items: images encoded, prompt evaluated (runtime/progress.py).

        json_schema (a dict or its JSON text): the answer is JSON valid for it, unless cut by
        max_new_tokens; grammar: llama.cpp GBNF text instead (runtime/constrain.py).
        repetition_guard: stop an answer that loops, finish_reason "repetition" (runtime/repetition.py)."""
        if stop is None or isinstance(stop, str):
            stop = () if not stop else (stop,)
        elif not isinstance(stop, (list, tuple)):
            raise InputError("stop must be a string or a list of strings")
        sampling = gen.Sampling(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop), repetition_guard)
        sampling.check()
        _check_image_options(think, max_slices, fit, window)
        gbnf = constrain.grammar_for(json_schema, grammar, think)
        return self._stream(messages, sampling, think, dict(window=window, max_slices=max_slices, fit=fit), gbnf,
                            progress)

    def _stream(self, messages, sampling: gen.Sampling, think: bool, image_opts: dict, gbnf: str | None = None,
                progress: bool = False):
        t0 = time.perf_counter()
        with self._serialized():
            yield from self._answer(messages, sampling, think, image_opts, t0, gbnf, progress)

    def _fit_threads(self) -> None:
        """Run beside what other programs keep busy (runtime/machine.OthersLoad): on a kiosk whose
        other programs hold a core, one llama.cpp thread fewer decodes faster than all of them."""
        self.engine.set_threads(threads_beside(self.others_load.cores(), self.threads))

    def _answer(self, messages, sampling: gen.Sampling, think: bool, image_opts: dict, t0: float,
                gbnf: str | None = None, progress: bool = False):
        grammar = constrain.Constraint(constrain.vocab_pointer(self.engine), gbnf) if gbnf else None
        try:
            yield from self._decode(messages, sampling, think, image_opts, t0, grammar, progress)
        finally:
            if grammar is not None:
                grammar.close()

    def _decode(self, messages, sampling: gen.Sampling, think: bool, image_opts: dict, t0: float, grammar=None,
                progress: bool = False):
        stats = Stats(load_s=self.load_s)
        self._fit_threads()
        steps = prefill.prefill_steps(self, messages, think=think, stats=stats,
                                      reserve=min(sampling.max_new_tokens, 1024), **image_opts)
        prompt = (yield from steps) if progress else finished(steps)
        n_prompt = len(prompt.ids)
        thoughts, n_new, t_first, shown = chatfmt.ThoughtFilter(), 0, None, []
        self._fit_threads()
        look = self.speculation.lookahead(self.engine, grammar)
        for step in gen.decode(self.engine, sampling, self.vocab, grammar, look):
            if step.token is not None:
                n_new += 1
                if n_new % REFIT_TOKENS == 0:
                    self._fit_threads()
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = round(t_first - t0, 4)
            text = thoughts.push(step.text)
            if step.finish_reason is None:
                shown.append(text)
                yield Response(text, step.token, n_prompt, n_new)
                continue
            thought, rest = thoughts.finish()
            if n_new > 1:
                stats.decode_tok_s = round((n_new - 1) / (time.perf_counter() - t_first), 2)
            stats.peak_rss_mb = peak_rss_mb()
            if look is not None:
                stats.drafted_tokens, stats.accepted_tokens = look.stats.drafted, look.stats.accepted
            if step.loop is not None:
                stats.repetition_period, stats.repetition_tokens = step.loop.period, step.loop.tokens
            # box_2d answers on the picture as given, from the sizes the prompt's one decode found
            boxes = answer_boxes("".join(shown) + text + rest, prompt.sizes, image_opts["fit"] or self.fit)
            yield Response(text + rest, None, n_prompt, n_new, step.finish_reason, thought, stats, boxes)

    def chat(self, messages, max_new_tokens: int = gen.DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=(), think: bool = False, *, window=None,
             max_slices: int = DEFAULT_MAX_SLICES, fit: str | None = None, json_schema=None,
             grammar: str | None = None, repetition_guard: bool = True) -> Reply:
        """Answer a chat: `stream`, joined."""
        pieces = []
        for r in self.stream(messages, max_new_tokens, temperature, top_p, top_k, seed, stop, think,
                             window=window, max_slices=max_slices, fit=fit, json_schema=json_schema,
                             grammar=grammar, repetition_guard=repetition_guard):
            pieces.append(r.text)
        text = "".join(pieces)
        if json_schema is not None and r.finish_reason in gen.CUT:  # closed at its last complete entry
            text = close_cut_answer(text, json_schema, r.stats)
        return Reply(text, r.thought, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.stats, r.boxes)


def _check_image_options(think, max_slices, fit, window=None) -> None:
    from medgemma_edge.runtime.preprocess import FITS

    if window is not None and not isinstance(window, str):
        raise InputError(f"window must be a preset name or 'lo:hi,...' text, got {type(window).__name__}")
    if not isinstance(think, bool):
        raise InputError(f"think must be True or False, got {type(think).__name__}")
    if not isinstance(max_slices, int) or isinstance(max_slices, bool) or max_slices < 1:
        raise InputError(f"max_slices must be a positive integer, got {max_slices!r:.40}")
    if fit is not None and fit not in FITS:
        raise InputError(f"unknown fit {fit!r:.40} — use one of {', '.join(FITS)}")

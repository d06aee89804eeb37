"""`runtime.load(bundle_dir)` → `Model`: the one loading path for the CLI, the server and the tests."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from runtime import chat as chatfmt
from runtime import generate as gen
from runtime.embed_cache import DEFAULT_DISK_MB, DEFAULT_MEMORY_ITEMS, EmbeddingCache, pixel_digest
from runtime.errors import BundleError, InputError
from runtime.memory import peak_rss_mb
from runtime.inputs import DEFAULT_MAX_SLICES, load_pictures
from runtime.preprocess import DEFAULT_FIT, resize_square


def _gpu_layers(device: str) -> int:
    import llama_cpp

    if device == "cpu":
        return 0
    has_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    if device == "cuda" and not has_gpu:
        raise InputError("device 'cuda' asked for, but this llama-cpp-python was built without GPU "
                         "support — rebuild it with CMAKE_ARGS=-DGGML_CUDA=on, or use --device cpu")
    return -1 if has_gpu else 0


AUTO_CONTEXT_START = 4096


def load(bundle_dir, device: str = "auto", threads: int | None = None, context: int | None = None,
         fit: str = DEFAULT_FIT, image_cache_dir=None, image_cache_mb: float = DEFAULT_DISK_MB) -> "Model":
    """Read and check the bundle's manifest, then build the backend it names.

    context=None grows the context to what each prompt needs (a CT series of 85 slices needs
    ~23k tokens) up to the model's training length; a number fixes it.
    image_cache_dir: also keep image embeddings on disk there (bounded by image_cache_mb), so the
    same image is not encoded again after a restart; off by default (see runtime/embed_cache).
    """
    from runtime.manifest import read_manifest

    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {device!r} — use auto, cpu or cuda")
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)  # raises BundleError: missing, unreadable, unknown version
    backend = manifest.get("backend")
    if backend != "gguf":
        raise BundleError(f"this runtime reads GGUF bundles; {bundle.name} is '{backend}' — "
                          "export it with --format gguf")
    files = {f["role"]: f for f in manifest["files"]}
    for f in files.values():  # the cheap check on every load; `medgemma-edge verify` hashes them
        path = bundle / f["path"]
        if not path.is_file():
            raise BundleError(f"bundle file {f['path']} is missing — copy the whole bundle folder again")
        if path.stat().st_size != f["size"]:
            raise BundleError(f"bundle file {f['path']} has {path.stat().st_size} bytes, the manifest "
                              f"says {f['size']} — the copy is incomplete; copy it again")
    return Model(bundle, manifest, device=device, threads=threads, context=context, fit=fit,
                 image_cache_dir=image_cache_dir, image_cache_mb=image_cache_mb)


class Model:
    def __init__(self, bundle: Path, manifest: dict, *, device: str, threads, context: int | None, fit: str,
                 image_cache_dir=None, image_cache_mb: float = DEFAULT_DISK_MB):
        from runtime.backends.llama_engine import LlamaEngine

        t0 = time.perf_counter()
        self.bundle, self.manifest, self.fit, self.device = bundle, manifest, fit, device
        files = {f["role"]: f for f in manifest["files"]}
        self.auto_context = context is None
        self.engine = LlamaEngine(str(bundle / files["text"]["path"]), n_ctx=context or AUTO_CONTEXT_START,
                                  threads=threads, n_gpu_layers=_gpu_layers(device))
        self._vision_path = bundle / files["vision"]["path"] if "vision" in files else None
        self._vision = None
        image = manifest.get("image") or {}
        self.image_size = int(image.get("size", 896))
        self.image_tokens = int(image.get("tokens_per_image", 256))
        self.image_token_id = (manifest.get("special_tokens") or {}).get("image_soft_token")  # None: text-only
        self.demo_notice = manifest.get("demo_notice")
        self.image_cache = None
        if self._vision_path is not None:
            vision_id = files["vision"].get("sha256") or _file_id(self._vision_path)
            self.image_cache = EmbeddingCache((self.image_tokens, self.engine.n_embd), vision_id,
                                              memory_items=DEFAULT_MEMORY_ITEMS, disk_dir=image_cache_dir,
                                              disk_mb=image_cache_mb)
        self.load_s = round(time.perf_counter() - t0, 3)

    # -- images --------------------------------------------------------------------------------
    def _require_vision(self) -> None:
        if self._vision_path is None:
            raise InputError("this bundle is text-only and cannot take images — "
                             "ask without --image, or export a multimodal checkpoint")

    def _vision_encoder(self):
        if self._vision is None:
            self._require_vision()
            from runtime.backends import open_vision

            self._vision = open_vision(self._vision_path, self.engine.model, self.engine.n_embd,
                                       self.engine.threads, self.device, self.manifest.get("image"))
        return self._vision

    def image_embeddings(self, pixels: np.ndarray) -> tuple[str, np.ndarray, bool]:
        """(digest, embeddings (tokens, n_embd), from_cache) for S×S uint8 RGB pixels."""
        self._require_vision()
        digest = pixel_digest(pixels)
        emb, _ = self.image_cache.get(digest)
        if emb is not None:  # the vision file is not even loaded for a cached image
            return digest, emb, True
        emb = self._vision_encoder().encode(pixels)
        if emb.shape[0] != self.image_tokens:
            raise BundleError(f"the vision file gave {emb.shape[0]} tokens per image, the manifest says "
                              f"{self.image_tokens} — export the bundle again")
        self.image_cache.put(digest, emb)
        return digest, emb, False

    # -- prompt --------------------------------------------------------------------------------
    def _prefill(self, messages, *, think: bool, window, max_slices, fit, stats: dict, reserve: int = 1) -> int:
        """Evaluate the prompt for `messages`, reusing the cached prefix; returns prompt length."""
        t0 = time.perf_counter()
        loader = lambda src: load_pictures(src, window=window, max_slices=max_slices)
        expanded, slots = chatfmt.expand_images(messages, loader)
        if slots:
            self._require_vision()  # a text-only bundle refuses images here, before any work
        views = [resize_square(s.pixels, self.image_size, fit or self.fit) for s in slots]
        stats["preprocess_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        ids = self.engine.tokenize(chatfmt.render_prompt(expanded, image_tokens=self.image_tokens, think=think))
        runs = _image_runs(ids, self.image_token_id) if self.image_token_id is not None else []
        if len(runs) != len(views) or any(e - s != self.image_tokens for s, e in runs):
            raise BundleError("the prompt's image slots do not match the images — the bundle's tokenizer "
                              "lacks <image_soft_token>; export the bundle again")
        t1 = time.perf_counter()
        images = [self.image_embeddings(view) for view in views]  # (digest, embeddings, from_cache)
        stats["images_from_cache"] = sum(hit for _, _, hit in images)
        stats["image_encode_s"] = round(time.perf_counter() - t1, 3)
        keys = list(ids)
        for (s, e), (digest, _, _) in zip(runs, images):
            keys[s:e] = [("img", digest, j) for j in range(e - s)]
        needed = len(keys) + reserve
        if needed > self.engine.n_ctx and not (self.auto_context and self.engine.grow_context(needed)):
            limit = self.engine.n_ctx_train if self.auto_context else self.engine.n_ctx
            raise InputError(f"the prompt needs {len(keys)} tokens (+{reserve} for the answer) but the context "
                             f"holds {limit} — shorten the question, use fewer images or slices"
                             + ("" if self.auto_context else ", or raise --context"))
        keep = self.engine.sync_prefix(keys)
        for s, e in runs:  # an image block is evaluated whole or not at all
            if s < keep < e:
                keep = self.engine.truncate(s)
        t2 = time.perf_counter()
        pos = keep
        for (s, e), (_, emb, _) in zip(runs, images):
            if e <= pos:
                continue
            if pos < s:
                self.engine.eval_tokens(ids[pos:s])
            self.engine.eval_embeddings(emb, keys[s:e])
            pos = e
        if pos < len(ids):
            self.engine.eval_tokens(ids[pos:])
        dt = time.perf_counter() - t2
        stats["prompt_tokens"], stats["reused_tokens"] = len(ids), keep
        stats["prefill_tok_s"] = round((len(ids) - keep) / dt, 2) if dt > 0 else None
        return len(ids)

    def next_token_logits(self, messages, *, think: bool = False, window=None,
                          max_slices: int = DEFAULT_MAX_SLICES, fit: str | None = None) -> np.ndarray:
        """Logits (vocab,) for the first token of the model's reply, as float32."""
        self._prefill(messages, think=think, window=window, max_slices=max_slices, fit=fit,
                      stats={"_t0": time.perf_counter()})
        return self.engine.logits().copy()

    def chat(self, messages, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop=(), think: bool = False, stream: bool = False,
             *, window=None, max_slices: int = DEFAULT_MAX_SLICES, fit: str | None = None):
        """Answer a chat. Returns a `Reply`, or with stream=True an iterator of text pieces whose
        `.reply` attribute holds the `Reply` once it is exhausted."""
        sampling = gen.Sampling(max_new_tokens, temperature, top_p, top_k, seed,
                                tuple([stop] if isinstance(stop, str) else stop))
        sampling.check()
        run = _Run(self, messages, sampling, think, dict(window=window, max_slices=max_slices, fit=fit))
        if stream:
            return run
        for _ in run:
            pass
        return run.reply


class _Run:
    """One answer being generated: iterate for text pieces; `.reply` is set at the end."""

    def __init__(self, model: Model, messages, sampling, think: bool, image_opts: dict):
        self.model, self.messages, self.sampling, self.think = model, messages, sampling, think
        self.image_opts, self.reply = image_opts, None
        self._it = self._generate()

    def __iter__(self):
        return self._it

    def _generate(self):
        stats = {"_t0": time.perf_counter()}
        n_prompt = self.model._prefill(self.messages, think=self.think, stats=stats,
                                       reserve=min(self.sampling.max_new_tokens, 1024), **self.image_opts)
        pieces = gen.decode(self.model.engine, self.sampling, stats)
        raw, n_new, reason = yield from _hide_thought(pieces)
        thought, text = chatfmt.split_thought(raw)
        del stats["_t0"]
        stats["load_s"] = self.model.load_s
        stats["peak_rss_mb"] = peak_rss_mb()
        self.reply = chatfmt.Reply(text=text, thought=thought, finish_reason=reason,
                                   prompt_tokens=n_prompt, completion_tokens=n_new, stats=stats)


def _hide_thought(pieces):
    """Pass text pieces on, minus a leading `<unused94>…<unused95>` thought; return decode's result."""
    raw, shown = "", 0
    while True:
        try:
            raw += next(pieces)
        except StopIteration as done:
            result = done.value
            break
        visible = _visible(raw)
        if visible is not None and len(visible) > shown:
            yield visible[shown:]
            shown = len(visible)
    visible = chatfmt.split_thought(result[0])[1]
    if len(visible) > shown:
        yield visible[shown:]
    return result


def _visible(raw: str) -> str | None:
    """The answer part of raw output so far, or None while a thought is still open."""
    if chatfmt.THOUGHT_OPEN in raw:
        if chatfmt.THOUGHT_CLOSE not in raw:
            return None
        return chatfmt.split_thought(raw)[1]
    if chatfmt.THOUGHT_OPEN.startswith(raw[: len(chatfmt.THOUGHT_OPEN)]) and len(raw) < len(chatfmt.THOUGHT_OPEN):
        return None  # could still become the opening marker
    return raw


def _file_id(path: Path) -> str:
    """A stand-in identity for a vision file whose manifest has no hash: name, size, mtime."""
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


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

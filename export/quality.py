"""How much a quantized bundle moved away from its unquantized export.

Text: the shipped medical exchanges (export/data/quality_prompts.json) are rendered with the
bundle's chat template and run teacher-forced through both GGUFs; at every position the
quantized next-token distribution is compared with the reference one (KL divergence, top-1
agreement). Vision: a few fixed synthetic images go through both mmproj files (cosine of the
image embeddings). The reference runs first and its logits wait on disk, so only one model is
in memory at a time.
"""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

KL_CHUNK = 32  # positions per softmax (32 × 262k × 4 B ≈ 34 MB per array)
# A position is decisive when the reference's top-1 logit leads its runner-up by at least this
# many nats (the top token at least e times likelier). Quantization noise flips near ties either way,
# and which ones depends on the CPU's kernels (summation order differs between AVX2 and AVX-512);
# a flip at a decisive position is a real loss of fidelity on any CPU.
DECISIVE_GAP = 1.0


def load_prompts() -> list[dict]:
    text = resources.files("medgemma_edge.export").joinpath("data/quality_prompts.json").read_text(encoding="utf-8")
    return json.loads(text)["prompts"]


def render_exchanges(chat_template: str, prompts: list[dict], bos: str = "<bos>") -> list[str]:
    """Each exchange as the model sees it: user turn, then the model's answer."""
    from medgemma_edge.runtime.chat_template import compile_template

    tpl = compile_template(chat_template)  # the runtime's sandbox, as transformers renders it
    return [tpl.render(messages=[{"role": "user", "content": p["user"]},
                                 {"role": "assistant", "content": p["answer"]}],
                       bos_token=bos, add_generation_prompt=False) for p in prompts]


def _open_llama(path: Path, n_ctx: int, threads: int, vocab_only: bool = False):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                 logits_all=True, n_threads=threads or None, vocab_only=vocab_only, verbose=False)


def _close(llm) -> None:
    llm.close()  # frees the model now, not whenever the garbage collector gets to it


def _teacher_forced(llm, ids: list[int]) -> np.ndarray:
    """Logits (len(ids), vocab) at every position of one token sequence."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    # float32 is enough: after subtracting the max, log-probabilities carry ~1e-6 absolute error,
    # far below the KL values worth reporting, at half the time of float64 over 262k-token rows
    x = np.array(x, dtype=np.float32)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_and_top1(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position: KL(ref || got) in nats, whether the top-1 tokens agree, and whether the
    reference is decisive there (top-1 leads by ≥ DECISIVE_GAP)."""
    kls, agree, decisive = [], [], []
    for s in range(0, ref.shape[0], KL_CHUNK):
        r = np.asarray(ref[s:s + KL_CHUNK], dtype=np.float32)
        lp, lq = _log_softmax(r), _log_softmax(got[s:s + KL_CHUNK])
        kls.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
        agree.append(r.argmax(-1) == got[s:s + KL_CHUNK].argmax(-1))
        top2 = np.partition(r, -2, axis=-1)[:, -2:]
        decisive.append(top2[:, 1] - top2[:, 0] >= DECISIVE_GAP)
    return np.concatenate(kls), np.concatenate(agree), np.concatenate(decisive)


def compare_text(reference: Path, quantized: Path, chat_template: str, threads: int = 0,
                 reference_type: str = "f32") -> dict:
    """Teacher-forced next-token agreement of `quantized` with `reference` over the shipped prompts."""
    from medgemma_edge.runtime.backends.llama_logs import install

    install()  # only errors: model loads log warnings the user cannot act on
    return _compare_text(reference, quantized, chat_template, threads, reference_type)


def _compare_text(reference, quantized, chat_template, threads, reference_type) -> dict:
    prompts = load_prompts()
    texts = render_exchanges(chat_template, prompts)
    llm = _open_llama(reference, 64, threads, vocab_only=True)
    seqs = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
    _close(llm)
    n_ctx = max(len(s) for s in seqs) + 8

    def runner(path):
        def open_():
            llm = _open_llama(path, n_ctx, threads)
            return (lambda ids: _teacher_forced(llm, ids)), (lambda: _close(llm))
        return open_

    return compare_sequences(seqs, runner(reference), runner(quantized), reference_type, len(prompts),
                             scratch=quantized.parent)


def compare_sequences(seqs: list[list[int]], open_reference, open_quantized, reference_type: str,
                      n_prompts: int, scratch: Path) -> dict:
    """The text report for any backend: `open_x()` returns (forward, close), forward(ids) giving
    the teacher-forced logits (len(ids), vocab) of one sequence. The reference runs first and its
    logits wait on disk (in `scratch`), so one model is in memory at a time."""
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="quality-", dir=scratch) as tmp:
        ref_logits = []
        forward, close = open_reference()
        try:
            for i, ids in enumerate(tqdm(seqs, desc=f"quality: {reference_type} reference", leave=False)):
                logits = forward(ids)
                arr = np.lib.format.open_memmap(Path(tmp) / f"{i}.npy", mode="w+", dtype=np.float32,
                                                shape=logits.shape)
                arr[:] = logits
                arr.flush()
                del arr, logits
                ref_logits.append(Path(tmp) / f"{i}.npy")
        finally:
            close()
        forward, close = open_quantized()
        try:
            per_prompt = [kl_and_top1(np.load(ref_path, mmap_mode="r"), forward(ids))
                          for ids, ref_path in tqdm(list(zip(seqs, ref_logits)), desc="quality: quantized",
                                                    leave=False)]
        finally:
            close()
    kl, top1, decisive = (np.concatenate(parts) for parts in zip(*per_prompt))
    return {"reference": reference_type, "prompts": n_prompts, "positions": int(kl.size),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float(top1.mean()),
            "decisive_positions": int(decisive.sum()),
            "top1_agreement_decisive": float(top1[decisive].mean()) if decisive.any() else None}


def quality_images(size: int, n: int = 2) -> list[np.ndarray]:
    """Fixed synthetic RGB images (uint8, size×size×3): radiograph-like, colour gradient, edges, noise.

    Two by default: one MedGemma 4B encode takes tens of seconds on a small CPU, and the cosine of
    image embeddings varies little from image to image."""
    rng = np.random.default_rng(20240601)
    y, x = np.mgrid[0:size, 0:size] / size
    disk = ((x - 0.45) ** 2 + (y - 0.55) ** 2 < 0.08).astype(np.float64)
    gray = np.clip(0.2 + 0.5 * y + 0.3 * disk, 0, 1)  # a radiograph-like gradient and a dense blob
    checker = ((np.floor(x * 16) + np.floor(y * 16)) % 2).astype(np.float64)
    images = [
        np.repeat(gray[..., None], 3, axis=2),
        np.stack([x, y, 1 - x * y], axis=2),
        np.repeat(checker[..., None], 3, axis=2) * 0.8 + 0.1,
        rng.random((size, size, 3)),
    ]
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images[:n]]


# the reference file's embeddings of the quality images, kept for the next comparison with it (the
# f32 tower is the slowest file to run, and an export compares up to four files with it)
_REFERENCE_EMBEDDINGS: dict = {}


def compare_vision(text_gguf: Path | None, reference: Path, quantized: Path, image_size: int,
                   threads: int = 0, reference_type: str = "f32", image: dict | None = None,
                   n_embd: int | None = None) -> dict:
    """Cosine between image embeddings of the reference and the quantized vision file (GGUF or ONNX).
    text_gguf: the text model a GGUF mmproj needs; None when both files are ONNX (then n_embd, the
    text model's width, is given)."""
    from medgemma_edge.runtime.backends.llama_logs import install

    install()
    return _compare_vision(text_gguf, reference, quantized, image_size, threads, reference_type, image, n_embd)


def _compare_vision(text_gguf, reference, quantized, image_size, threads, reference_type, image,
                    n_embd=None) -> dict:
    from tqdm import tqdm

    from medgemma_edge.runtime.backends import open_vision

    model = None
    if text_gguf is not None:
        import llama_cpp

        llama_cpp.llama_backend_init()
        # A vocab-only load reports width 0, which mtmd needs; the weights are memory-mapped, not read.
        model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(),
                                                     llama_cpp.llama_model_default_params())
        n_embd = int(llama_cpp.llama_model_n_embd(model))
    images = quality_images(image_size)
    try:
        outs = []
        for path in (reference, quantized):
            st = Path(path).stat()
            key = (str(path), st.st_size, st.st_mtime_ns, image_size, repr(image))
            if path == reference and key in _REFERENCE_EMBEDDINGS:
                outs.append(_REFERENCE_EMBEDDINGS[key])
                continue
            enc = open_vision(path, model, n_embd, threads, image=image)
            try:
                outs.append([enc.encode(im) for im in tqdm(images, desc=f"quality: vision {path.stem}",
                                                            leave=False)])
            finally:
                enc.close()
            if path == reference:  # one export compares several vision files with the same reference
                _REFERENCE_EMBEDDINGS.clear()
                _REFERENCE_EMBEDDINGS[key] = outs[-1]
    finally:
        if model is not None:
            llama_cpp.llama_model_free(model)
    cos = [float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
           for a, b in zip(*outs)]
    return {"reference": reference_type, "images": len(images),
            "mean_cosine": float(np.mean(cos)), "min_cosine": float(np.min(cos))}


def summary_lines(quality: dict | None) -> list[str]:
    """Human-readable lines for the end of an export."""
    if not quality:
        return ["quality: not measured (the export is not quantized below its reference)"]
    lines = []
    t = quality.get("text")
    if t:
        lines.append(f"text {t['quant']} vs {t['reference']}: top-1 agreement {100 * t['top1_agreement']:.1f}% "
                     f"over {t['positions']} positions, mean KL {t['mean_kl']:.4f} nats (max {t['max_kl']:.3f})")
        if t.get("top1_agreement_decisive") is not None:
            lines.append(f"  where {t['reference']} is decisive (top-1 leads by ≥ {DECISIVE_GAP:g} nat, "
                         f"{t['decisive_positions']} positions): top-1 agreement "
                         f"{100 * t['top1_agreement_decisive']:.1f}%")
    for v in quality.get("vision_files") or ([quality["vision"]] if quality.get("vision") else []):
        lines.append(f"vision {v['quant']} vs {v['reference']}: image-embedding cosine mean "
                     f"{v['mean_cosine']:.5f}, min {v['min_cosine']:.5f} over {v['images']} images")
    return lines

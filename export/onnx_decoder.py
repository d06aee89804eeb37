"""Gemma 3's text decoder as one ONNX graph (onnxruntime-genai's model builder), and the embedding
table that feeds it.

    export_decoder(src: Path, out_dir: Path, quant: str, *, threads: int = 0, say=print,
                   options: dict | None = None, fix_local_rope: bool = True) -> dict
    write_embeddings(src: Path, out_dir: Path, quant: str, *, say=print) -> dict

quant in QUANTS = ("fp32", "int8", "int4"). Both return a dict for the bundle manifest.

The graph (runtime/backends/onnx_text.py drives it): `inputs_embeds` f32 [1, S, hidden] — token
rows already multiplied by sqrt(hidden), image rows as the projector gives them — `attention_mask`
int64 [1, total] (all ones: only its sum and width are read), `attention_bias_sliding` /
`attention_bias_full` f32 [1, 1, S, total] (added to the attention scores of the sliding /
global layers: 0 or -inf-like), `past_key_values.{i}.key/.value` f32 [1, kv_heads, past, head_dim];
outputs `logits` f32 [1, S, vocab] and `present.{i}.key/.value`. Every layer's cache holds the
whole sequence (`windowed_kv_cache=false`): the window is in the bias, so a cached prefix can be
reused from any position.

The builder's defects and our fixes are listed in export/onnx_builder_fixes.py. Weights: int8 and
int4 are MatMulNBits (block 32, symmetric, int8 activations on the CPU: accuracy_level 4); norms,
rope caches and the attention stay fp32.

The int4 default was chosen on Gemma 3 270M against the fp32 graph, teacher-forced over
tests/data/medical_text.txt: of int4 RTN and k_quant, each with and without an int8 LM head,
k_quant with the int8 LM head kept the most top-1 tokens (decisive ones too) and had the lowest
KL, for a much slower export (k_quant searches scales per block), paid once. int8 stays close to
fp32 throughout. tests/test_onnx_decoder_270m.py measures the chosen options on every run (its
MEASURED holds their numbers). 270M is fragile at 4 bits; MedGemma 4B is expected to lose far
less, unmeasured here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from medgemma_edge.export.checkpoint import open_checkpoint, read_rows
from medgemma_edge.export.onnx_builder_fixes import BIAS_INPUTS, import_builder, load_config, patched
from medgemma_edge.export.onnx_lean import release_memory
from medgemma_edge.runtime.errors import ExportError
from medgemma_edge.runtime.memory import peak_rss_mb

QUANTS = ("fp32", "int8", "int4")
BUILDER = "onnxruntime-genai 0.18.0"
DECODER_FILE = "decoder.onnx"
PROGRESS_EVERY_S = 10  # a quantization progress line at most this often
# Builder options for every build: inputs_embeds in, full-length caches on every layer, logits of
# the last position only (the LM head on every prompt row: a 262k-wide matmul per row, for nothing).
BASE_OPTIONS = {"exclude_embeds": "true", "windowed_kv_cache": "false", "prune_lm_head": "true",
                "filename": DECODER_FILE}
# Per quant, chosen by measurement (module docstring). block 32 is the builder's default.
QUANT_OPTIONS = {
    "fp32": {},
    "int8": {"block_size": "32", "accuracy_level": "4"},
    "int4": {"block_size": "32", "accuracy_level": "4", "algo_config": "k_quant_last"},
}
EMBED_ROWS_PER_READ = 16384


class _Lines(io.TextIOBase):
    """stdout of the builder, one `say` per line (its progress, in our log)."""

    def __init__(self, say):
        self.say, self.buf, self.real = say, "", sys.stdout

    def write(self, s):
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if line.strip():
                with contextlib.redirect_stdout(self.real):  # `say` may be print
                    self.say(f"  builder: {line.strip()}")
        return len(s)


def export_decoder(src: Path, out_dir: Path, quant: str, *, threads: int = 0, say=print,
                   options: dict | None = None, fix_local_rope: bool = True, lean: bool = True) -> dict:
    """Build `out_dir/decoder.onnx` (+ `decoder.onnx.data`) from a Gemma 3 checkpoint.

    options: builder extra options that replace QUANT_OPTIONS[quant] entries (measurements only).
    fix_local_rope=False keeps the builder's scaled rope on the sliding layers (tests only).
    lean=False: the builder's own float32 load and whole-graph quantization (tests compare).
    """
    if quant not in QUANTS:
        raise ExportError(f"unknown ONNX decoder quant {quant!r} — use one of {', '.join(QUANTS)}")
    src, out_dir = Path(src), Path(out_dir)
    ckpt = open_checkpoint(src)  # a readable Gemma 3 checkpoint, or an ExportError that says why not
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = {**BASE_OPTIONS, **QUANT_OPTIONS[quant], **(options or {})}
    t0 = time.perf_counter()
    say(f"ONNX decoder {quant}: building with {BUILDER} (the 4B model takes several minutes)")
    config = load_config(src, ckpt.architecture)
    run_builder(src, out_dir, quant, opts, config,
                lambda builder: patched(builder, src, config, fix_local_rope=fix_local_rope, lean=lean,
                                        progress=_quant_progress(say, quant)),
                threads=threads, stdout=_Lines(say))
    info = describe_decoder(out_dir / DECODER_FILE, config)
    info.update(quant=quant, options={k: v for k, v in opts.items() if k != "filename"},
                local_rope_fixed=fix_local_rope, seconds=round(time.perf_counter() - t0, 1))
    size = sum((out_dir / f).stat().st_size for f in [info["file"], *info["data_files"]])
    say(f"ONNX decoder {quant}: {size / 2**20:.0f} MiB in {info['seconds']} s")
    return info


def run_builder(src: Path, out_dir: Path, precision: str, opts: dict, config, patch, *, threads: int = 0,
                stdout=None) -> None:
    """onnxruntime-genai's builder on `src` with extra options `opts`, inside `patch(builder)` (a
    context manager that fixes it up: export/onnx_builder_fixes.patched), its prints to `stdout`;
    torch threads and the quantizer's log level restored and memory given back afterwards."""
    builder = import_builder()
    cache = Path(out_dir) / ".builder-cache"
    prev_threads = _set_torch_threads(threads)
    # The quantizer logs every node at INFO, and an ERROR for the LM head's row-selecting Gather
    # it rightly leaves alone; real failures raise.
    qlog = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    prev_level = qlog.level
    qlog.setLevel(logging.CRITICAL)
    try:
        with patch(builder), contextlib.redirect_stdout(stdout or sys.stderr):
            kv = [f"{k}={v}" for k, v in opts.items()]
            extra = builder.parse_extra_options(None, str(src), str(out_dir), precision, "cpu", str(cache), kv)
            builder.create_model(None, str(src), str(out_dir), precision, "cpu", str(cache), **extra)
    finally:
        qlog.setLevel(prev_level)
        _set_torch_threads(prev_threads)
        shutil.rmtree(cache, ignore_errors=True)
        release_memory()


def _quant_progress(say, quant: str):
    """A progress callback for the weight-by-weight quantization: a line every PROGRESS_EVERY_S
    seconds and at the end."""
    state = {"t0": None, "last": 0.0}

    def progress(done: int, total: int, name: str) -> None:
        if state["t0"] is None:  # the clock starts with the first weight (loading came before)
            state["t0"] = time.perf_counter()
        now = time.perf_counter() - state["t0"]
        if done == total or now - state["last"] >= PROGRESS_EVERY_S:
            state["last"] = now
            left = f", ~{now / (done - 1) * (total - done):.0f} s left" if done > 1 else ""
            say(f"  {quant} weights: {done}/{total} quantized ({name}), {now:.0f} s{left}, "
                f"peak memory {peak_rss_mb() / 1024:.1f} GB")
    return progress


def _set_torch_threads(n: int) -> int:
    import torch

    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    return prev


def describe_decoder(path: Path, config) -> dict:
    """The manifest entry for a built decoder: its shape, layer kinds and graph I/O."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    text = getattr(config, "text_config", None) or config
    n = text.num_hidden_layers
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * n)
    inputs = [i.name for i in model.graph.input]
    data = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    return {
        "file": path.name, "data_files": data, "builder": BUILDER,
        "layers": n, "kv_heads": text.num_key_value_heads, "head_dim": text.head_dim,
        "hidden": text.hidden_size, "vocab": text.vocab_size, "max_positions": text.max_position_embeddings,
        "sliding_window": int(text.sliding_window or 0),
        "layer_types": ["sliding" if t == "sliding_attention" else "full" for t in types],
        "attention_bias": {k: v for k, v in BIAS_INPUTS.items() if v in inputs},
        "inputs": inputs, "outputs": [o.name for o in model.graph.output],
        "outputs_per_layer": ["present.{i}.key", "present.{i}.value"],
        # Gemma3TextScaledWordEmbedding: rows × sqrt(hidden), the scale a float32 tensor (cast to
        # the weights' dtype: float32 here, as the graph computes in float32).
        "embed_scale": float(np.float32(math.sqrt(text.hidden_size))),
    }


def write_embeddings(src: Path, out_dir: Path, quant: str, *, say=print) -> dict:
    """The token embedding table the runtime reads rows from (the graph takes inputs_embeds).

    fp32: `embed_tokens.f32.npy` [vocab, hidden]. int8/int4: `embed_tokens.i8.npy` int8 rows and
    `embed_tokens.scale.npy` f32 [vocab] (symmetric, absmax / 127 per row): a quarter of the size,
    and a row costs one multiply. Both memory-mappable. Rows are raw (not × sqrt(hidden)).
    """
    if quant not in QUANTS:
        raise ExportError(f"unknown ONNX decoder quant {quant!r} — use one of {', '.join(QUANTS)}")
    ckpt = open_checkpoint(src)
    ref = ckpt.tensors[("text", "embed_tokens.weight")]
    rows, hidden = ref.shape
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if quant == "fp32":
        table = np.lib.format.open_memmap(out_dir / "embed_tokens.f32.npy", "w+", np.float32, (rows, hidden))
        scale = None
    else:
        table = np.lib.format.open_memmap(out_dir / "embed_tokens.i8.npy", "w+", np.int8, (rows, hidden))
        scale = np.zeros(rows, np.float32)
    sq_err = sq_ref = 0.0
    max_err = 0.0
    for start in range(0, rows, EMBED_ROWS_PER_READ):
        block = read_rows(ref, start, min(start + EMBED_ROWS_PER_READ, rows))  # (n, hidden) f32
        stop = start + len(block)
        if scale is None:
            table[start:stop] = block
        else:
            q, s = quantize_rows(block)
            table[start:stop], scale[start:stop] = q, s
            err = q.astype(np.float32) * s[:, None] - block
            sq_err += float(np.square(err, dtype=np.float64).sum())
            max_err = max(max_err, float(np.abs(err).max()))
        sq_ref += float(np.square(block, dtype=np.float64).sum())
        say(f"  embeddings: {stop}/{rows} rows")
    table.flush()
    del table
    files = ["embed_tokens.f32.npy"] if scale is None else ["embed_tokens.i8.npy", "embed_tokens.scale.npy"]
    if scale is not None:
        np.save(out_dir / "embed_tokens.scale.npy", scale)
    size = sum((out_dir / f).stat().st_size for f in files)
    info = {"files": files, "dtype": "f32" if scale is None else "int8_row", "rows": rows, "hidden": hidden,
            "bytes": size, "rel_rms_error": math.sqrt(sq_err / max(sq_ref, 1e-30)), "max_abs_error": max_err}
    say(f"embeddings {info['dtype']}: {size / 2**20:.0f} MiB, relative RMS error {info['rel_rms_error']:.2e} "
        f"in {time.perf_counter() - t0:.1f} s")
    return info


def quantize_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: (int8 rows, f32 scale per row); an all-zero row gets scale 0."""
    amax = np.abs(block).max(axis=1)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(block / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale

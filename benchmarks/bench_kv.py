"""KV cache precision (issue 25): llama.cpp's f16 cache against q8_0, for faithfulness, a prepared
study's size and restore time, and decode speed.

    python -m benchmarks.bench_kv [--threads 2] [--rounds 7] [--tokens 64] [--wait-idle 60]
    python -m benchmarks.bench_kv --part prepared   # one part again, the other kept from kv_cache.json
    python -m benchmarks.bench_kv --from benchmarks/results/kv_cache.json   # re-render, no rerun

Faithfulness, on the real Gemma 3 270M (its f32 and q4_k_m exports, benchmarks.bundles):
teacher-forced next-token logits over the quality exchanges (export/data/quality_prompts.json,
rendered with the bundle's template) and tests/data/medical_text.txt; each sequence's first half in
one batch, the rest one token at a time (a prefix, then a decode). For each export the reference
is the default path: f16 cache, flash attention off. Against it: f16 with flash attention on (its
effect alone) and q8_0 (which needs flash attention: both together). For scale, the q8_0 and q4_k_m
*weights* exports against f32 on the default path (quantizations the project ships). Per position
KL(reference || other), top-1 agreement, and top-1 on decisive positions (export/quality.DECISIVE_GAP:
the reference's top-1 leads by at least 1 nat).
Image-like blocks: 256 rows evaluated bidirectionally between a question's text, either real text's
scaled token embeddings (in distribution) or noise of the same norm (out of distribution; the 4B
prefill below uses such noise, for speed only), KL at the text after the block.

Prepared study, at the MedGemma-4B shape (the q4_k_m bundle, random weights): a prefix of image
blocks (256 random embedding rows each, evaluated bidirectionally as images are) is evaluated to
each of POSITIONS with each cache type and saved (`save_state`, what `encode` writes). Its size is
fitted (linear in positions on the global layers, capped at the window on the sliding-window ones)
and extrapolated to the 85-slice CT prefix (its length counted with the runtime's own prompt
rendering): prefilling ~22k positions at 4B takes too long on a few cores.
Then, in alternating rounds, per type: restore (read the largest state's file + `load_state`; warm
page cache) and decode (a short question, then --tokens greedy tokens). The disk's own read speed
(dd iflag=direct, past the page cache) turns a size into a cold-cache restore estimate.

Writes benchmarks/results/kv_cache.json and KV_CACHE.md (benchmarks/kv_report.py renders them;
REPORT.md and the docs quote them).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import bundles
from benchmarks.alternate import MIN_ROUNDS, MIN_TOKENS, alternate, paired_rates
from benchmarks.backends import QUESTION, say
from medgemma_edge.runtime.cache import cache_root

RESULTS = Path(__file__).parent / "results"
POSITIONS = (512, 1024, 1536, 2048)  # prefix lengths whose saved state is measured (the last: restore + decode),
# on both sides of the 4B's sliding window (1024), since its layers save no more than the window
CT_SLICES = 85  # MedGemma's CT/MR volume recipe (runtime/picture.DEFAULT_MAX_SLICES)
WEIGHTS = ("f32", "q4_k_m")  # 270M exports measured: the cleanest, and the default bundle's text quant
# (name, cache type, flash attention): the default path first, the reference of the others
CACHES = (("f16 cache", "f16", False), ("f16 cache, flash attention", "f16", True),
          ("q8_0 cache (flash attention)", "q8_0", True))
REFERENCE, FA, Q8 = (c[0] for c in CACHES)
ANCHOR = "q8_0"  # a weights export compared with f32 on the default path, for scale (as is q4_k_m)
QUANT_ONLY = "q8_0 cache vs f16 cache, both with flash attention"  # the cache type's own effect


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="threads (0: physical cores)")
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="alternating restore + decode rounds")
    p.add_argument("--tokens", type=int, default=MIN_TOKENS, help="greedy tokens decoded a round")
    p.add_argument("--positions", type=int, nargs="+", default=list(POSITIONS),
                   help="prefix lengths (multiples of 256) whose saved state is measured")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each part, wait up to S seconds for other processes to go quiet")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--part", choices=("all", "faithfulness", "prepared"), default="all",
                   help="measure one part only; the other is kept from the kv_cache.json in --out")
    p.add_argument("--from", dest="source", type=Path, metavar="KV_CACHE_JSON",
                   help="re-render KV_CACHE.md beside this kv_cache.json instead of measuring")
    return p.parse_args(argv)


def open_engine(gguf: Path, kv_cache: str, flash_attn: bool, n_ctx: int, threads: int):
    from medgemma_edge.runtime.backends.llama_engine import LlamaEngine

    return LlamaEngine(str(gguf), n_ctx=n_ctx, threads=threads, kv_cache=kv_cache, flash_attn=flash_attn)


def teacher_forced(engine, ids: list[int]) -> np.ndarray:
    """Logits (len(ids), vocab) at every position of `ids`, from an empty cache: the first half in
    one batch (a prepared prefix), the rest one token at a time (an answer's decode), since
    llama.cpp's CPU flash attention takes another kernel for one query row than for a batch."""
    engine.reset()
    split = len(ids) // 2
    engine.eval_tokens(ids[:split], rows=True)
    rows = [engine.logits_rows()]
    for tok in ids[split:]:
        engine.eval_tokens([tok])
        rows.append(engine.logits()[None])
    return np.concatenate(rows)


def sequences(engine, chat_template: str) -> list[list[int]]:
    """The quality exchanges as the model sees them, and a plain medical text."""
    from medgemma_edge.export.quality import load_prompts, render_exchanges

    texts = render_exchanges(chat_template, load_prompts())
    plain = (Path(__file__).resolve().parent.parent / "tests" / "data" / "medical_text.txt").read_text()
    return [engine.tokenize(t) for t in texts] + [engine.tokenize("<bos>" + plain)]


def agreement(parts: list, decode_only: bool = False) -> dict:
    """Per-sequence (kl, top1, decisive) arrays (export/quality.kl_and_top1) as one summary; with
    `decode_only`, of the positions evaluated one token at a time (each sequence's second half)."""
    if decode_only:
        parts = [tuple(a[a.size // 2:] for a in p) for p in parts]
    kl, top1, decisive = (np.concatenate(p) for p in zip(*parts))
    out = {"positions": int(kl.size), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
           "p99_kl": float(np.quantile(kl, 0.99)), "top1": float(top1.mean()), "decisive": int(decisive.sum()),
           "decisive_top1": float(top1[decisive].mean()) if decisive.any() else None,
           "decisive_flips": int((decisive & ~top1).sum())}
    return out if decode_only else {**out, "decode": agreement(parts, decode_only=True)}


def faithfulness(threads: int) -> dict:
    """Per weights export, each cache of CACHES against the default path (the first); and the
    weights exports' own distance from f32 on the default path. Teacher-forced on the real 270M."""
    from medgemma_edge.export.quality import DECISIVE_GAP, kl_and_top1
    from medgemma_edge.testing.models import build_gemma3_270m

    ckpt = build_gemma3_270m()
    exports = {q: bundles.bundle(ckpt, q) for q in (*WEIGHTS, ANCHOR)}
    manifest = json.loads((exports["f32"] / "manifest.json").read_text())
    files = {q: bundles.files(b)["text"] for q, b in exports.items()}
    probe = open_engine(files["f32"], "f16", False, 512, threads)
    seqs = sequences(probe, manifest["chat_template"])
    probe.close()
    n_ctx = max(512, -(-max(len(s) for s in seqs) // 256) * 256)  # image_blocks: 256 rows + the prompt
    engines = {(w, name): open_engine(files[w], kv, fa, n_ctx, threads) for w in WEIGHTS for name, kv, fa in CACHES}
    engines[(ANCHOR, REFERENCE)] = open_engine(files[ANCHOR], "f16", False, n_ctx, threads)
    caches = {(w, name): [] for w in WEIGHTS for name in (FA, Q8, QUANT_ONLY)}
    weights: dict[str, list] = {w: [] for w in (*WEIGHTS[1:], ANCHOR)}
    t0 = time.perf_counter()
    for i, ids in enumerate(seqs, 1):
        rows = {key: teacher_forced(e, ids) for key, e in engines.items()}
        for w in WEIGHTS:
            caches[(w, FA)].append(kl_and_top1(rows[(w, REFERENCE)], rows[(w, FA)]))
            caches[(w, Q8)].append(kl_and_top1(rows[(w, REFERENCE)], rows[(w, Q8)]))
            caches[(w, QUANT_ONLY)].append(kl_and_top1(rows[(w, FA)], rows[(w, Q8)]))
        for w in weights:
            weights[w].append(kl_and_top1(rows[("f32", REFERENCE)], rows[(w, REFERENCE)]))
        say(f"  [faithfulness] sequence {i}/{len(seqs)}: {len(ids)} positions")
    blocks = image_blocks(engines, files["f32"], seqs)
    for e in engines.values():
        e.close()
    return {"model": "Gemma 3 270M (real weights)", "reference": REFERENCE, "threads": threads,
            "sequences": len(seqs), "decisive_gap_nats": DECISIVE_GAP, "seconds": round(time.perf_counter() - t0, 1),
            "caches": {w: {name: agreement(caches[(w, name)]) for name in (FA, Q8, QUANT_ONLY)} for w in WEIGHTS},
            "weights": {w: agreement(p) for w, p in weights.items()}, "image_blocks": blocks}


BLOCK_PROMPT = ("<bos><start_of_turn>user\nRead this:", "\nWhat does it say about the patient?<end_of_turn>\n"
                "<start_of_turn>model\nThe patient")
CAUSAL = "f16 cache, the block causal (control)"


def image_blocks(engines: dict, f32_gguf: Path, seqs: list[list[int]], windows: int = 3) -> dict:
    """A 256-row block evaluated as an image is (bidirectionally) between a question's text: KL at
    the text after it, against the default path, per weights, cache and kind of rows: the scaled
    token embeddings of real text (in distribution) or noise of the same norm (out of distribution:
    activations the weights never saw). The causal control shows the measure sees the mask."""
    from gguf import GGUFReader
    from medgemma_edge.export.quality import kl_and_top1

    table = next(t for t in GGUFReader(str(f32_gguf)).tensors if t.name == "token_embd.weight").data
    flat = [t for s in seqs for t in s[1:]]
    kinds = {}
    for k in range(windows):
        ids = flat[k * 256:(k + 1) * 256]
        rows = np.asarray(table[ids], np.float32) * np.sqrt(table.shape[1])  # as Gemma 3's graph scales token rows
        kinds.setdefault("token rows", []).append(rows)
        noise = np.random.default_rng(k).standard_normal(rows.shape, dtype=np.float32)
        kinds.setdefault("noise rows", []).append(noise * np.linalg.norm(rows, axis=1, keepdims=True)
                                                  / np.linalg.norm(noise, axis=1, keepdims=True))
    out = {}
    for w in WEIGHTS:
        for kind, blocks in kinds.items():
            kl = {name: [] for name in (FA, Q8, CAUSAL)}
            for block in blocks:
                ref = block_logits(engines[(w, REFERENCE)], block, True)
                for name, (engine, bidirectional) in {FA: (engines[(w, FA)], True), Q8: (engines[(w, Q8)], True),
                                                      CAUSAL: (engines[(w, REFERENCE)], False)}.items():
                    kl[name].append(kl_and_top1(ref, block_logits(engine, block, bidirectional))[0])
            out.setdefault(w, {})[kind] = {name: float(np.concatenate(v).mean()) for name, v in kl.items()}
    return {"windows": windows, "kl_after_block": out}


def block_logits(engine, block: np.ndarray, bidirectional: bool) -> np.ndarray:
    """Logits at the text after `block`, evaluated between BLOCK_PROMPT's two halves."""
    engine.reset()
    engine.eval_tokens(engine.tokenize(BLOCK_PROMPT[0]))
    engine.eval_embeddings(block, [("img", "block", j) for j in range(len(block))], bidirectional=bidirectional)
    engine.eval_tokens(engine.tokenize(BLOCK_PROMPT[1]), rows=True)
    return engine.logits_rows()


def ct_prefix_positions(engine, image_token_id: int, image_tokens: int) -> int:
    """Positions of the prepared prefix of an 85-slice CT question (`encode`'s prompt: the card's
    radiologist system prompt, each slice followed by its label), by the runtime's own rendering."""
    from medgemma_edge.runtime import chat as chatfmt
    from medgemma_edge.runtime.presets import RADIOLOGIST

    content = [item for i in range(1, CT_SLICES + 1)
               for item in ({"type": "image"}, {"type": "text", "text": f"SLICE {i}"})]
    messages = [{"role": "system", "content": RADIOLOGIST}, {"role": "user", "content": content}]
    ids = chatfmt.tokenize_prompt(chatfmt.prompt_parts(messages, image_tokens=image_tokens), engine.tokenize)
    return len(ids) - ids[::-1].index(image_token_id)  # up to the end of the last image block


def image_block(n_embd: int, i: int) -> np.ndarray:
    """One stand-in image: 256 rows of unit-variance noise (the weights are random too)."""
    return np.random.default_rng(i).standard_normal((256, n_embd), dtype=np.float32)


def prefill_and_save(engine, counts: list[int], folder: Path, kv: str) -> tuple[dict, list]:
    """Evaluate image blocks up to each count, saving the state at each; sizes, rates, keys."""
    out, keys, done, t_eval = {}, [], 0, 0.0
    for count in counts:
        while done < count:
            block = [("img", f"block{done // 256}", j) for j in range(256)]
            t0 = time.perf_counter()
            engine.eval_embeddings(image_block(engine.n_embd, done // 256), block)
            t_eval += time.perf_counter() - t0
            keys += block
            done += 256
        t0 = time.perf_counter()
        data = engine.save_state()
        save_s = time.perf_counter() - t0
        path = folder / f"{kv}-{count}.state"
        t0 = time.perf_counter()
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        out[count] = {"bytes": len(data), "save_s": round(save_s, 3), "write_s": round(time.perf_counter() - t0, 3),
                      "prefill_tok_s": round(count / t_eval, 2)}
        say(f"  [{kv}] {count} positions: state {len(data) / 1e6:.1f} MB, prefill {count / t_eval:.1f} tok/s")
    return out, keys


def size_fit(sizes: dict, window: int) -> dict:
    """bytes = header + full × positions + windowed × min(positions, window), least squares, with the
    worst relative residual: llama.cpp saves every position of the global layers but only the last
    `window` of a sliding-window layer (state_write_data skips the cells its window masks)."""
    n = np.array(sorted(sizes), dtype=float)
    y = np.array([sizes[k]["bytes"] for k in sorted(sizes)], dtype=float)
    a = np.stack([np.ones_like(n), n, np.minimum(n, window)], axis=1)
    (header, full, windowed), *_ = np.linalg.lstsq(a, y, rcond=None)
    worst = float(np.max(np.abs(a @ (header, full, windowed) - y) / y))
    return {"window": window, "header_bytes": float(header), "full_layers_bytes_per_position": float(full),
            "window_layers_bytes_per_position": float(windowed), "worst_residual": worst}


def fitted_bytes(fit: dict, positions: int) -> float:
    return (fit["header_bytes"] + fit["full_layers_bytes_per_position"] * positions
            + fit["window_layers_bytes_per_position"] * min(positions, fit["window"]))


def decode_round(engine, path: Path, keys: list, question: list[int], tokens: int, restores: list) -> float:
    """Restore the saved prefix from its file, ask `question`, decode `tokens` greedily: tok/s."""
    t0 = time.perf_counter()
    data = path.read_bytes()
    t1 = time.perf_counter()
    if not engine.load_state(data, keys):
        raise RuntimeError(f"llama.cpp refused its own saved state {path.name}")
    restores.append({"read_s": t1 - t0, "load_s": time.perf_counter() - t1})
    engine.eval_tokens(question)
    tok = int(np.argmax(engine.logits()))
    t0 = time.perf_counter()
    for _ in range(tokens):
        engine.eval_tokens([tok])
        tok = int(np.argmax(engine.logits()))
    return round(tokens / (time.perf_counter() - t0), 3)


def disk_read_gb_s(path: Path) -> float | None:
    """Read speed of the disk under `path`, past the page cache (dd iflag=direct); None where the
    file system refuses direct reads."""
    t0 = time.perf_counter()
    proc = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"], capture_output=True)
    seconds = time.perf_counter() - t0
    return None if proc.returncode else round(path.stat().st_size / seconds / 1e9, 3)


def prepared(threads: int, counts: list[int], rounds: int, tokens: int) -> dict:
    """State sizes at each count per cache type, then restore + decode of the largest, alternating."""
    from benchmarks.checkpoint4b import build_4b

    bundle = bundles.bundle(build_4b(), "q4_k_m", bundles.DEFAULT, quality="vision")
    gguf = bundles.files(bundle)["text"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    bundles.warm([gguf])
    n_ctx = -(-(max(counts) + 64 + tokens) // 256) * 256
    types = {"f16": False, "q8_0": True}  # cache type -> flash attention (what the runtime turns on)
    engines = {kv: open_engine(gguf, kv, fa, n_ctx, threads) for kv, fa in types.items()}
    any_engine = next(iter(engines.values()))
    ct = ct_prefix_positions(any_engine, manifest["special_tokens"]["image_soft_token"],
                             manifest["image"]["tokens_per_image"])
    question = any_engine.tokenize("<end_of_image>\n\n" + QUESTION + "<end_of_turn>\n<start_of_turn>model\n")
    out = {"bundle": bundle.name, "ct_slices": CT_SLICES, "ct_prefix_positions": ct, "n_ctx": n_ctx,
           "question_tokens": len(question), "decode_tokens": tokens, "types": {}}
    with tempfile.TemporaryDirectory(prefix="kv-bench-", dir=cache_root()) as tmp:
        keys = {}
        for kv, engine in engines.items():
            sizes, keys[kv] = prefill_and_save(engine, counts, Path(tmp), kv)
            fit = size_fit(sizes, engine.n_swa)
            out["types"][kv] = {"flash_attn": types[kv], "sizes": sizes, "fit": fit, "ct_bytes": fitted_bytes(fit, ct)}
        largest = {kv: Path(tmp) / f"{kv}-{max(counts)}.state" for kv in engines}
        out["disk_read_gb_s"] = disk_read_gb_s(largest["f16"])
        restores: dict[str, list] = {kv: [] for kv in engines}
        runs = {kv: (lambda kv=kv: decode_round(engines[kv], largest[kv], keys[kv], question, tokens, restores[kv]))
                for kv in engines}
        say(f"[kv] restore {max(counts)} positions + decode {tokens} tokens, {rounds} alternating rounds ...")
        out["decode"] = alternate(runs, rounds, label="kv restore + decode")
    for kv, times in restores.items():
        times = times[1:]  # the first call was alternate()'s warm-up
        total = [t["read_s"] + t["load_s"] for t in times]
        out["types"][kv]["restore"] = {"positions": max(counts), "median_s": float(np.median(total)),
                                       "min_s": min(total), "max_s": max(total), "rounds": [round(t, 4) for t in total],
                                       "load_median_s": float(np.median([t["load_s"] for t in times]))}
    out["paired_decode"] = paired_rates(out["decode"], "q8_0", "f16")
    for e in engines.values():
        e.close()
    return out


def main(argv=None) -> dict:
    from benchmarks.kv_report import write
    from benchmarks.run import machine, wait_for_quiet
    from medgemma_edge.runtime.backends.llama_logs import install
    from medgemma_edge.runtime.machine import physical_cores

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.source:
        data = json.loads(args.source.read_text())
        print(write(args.source.parent, data))
        return data
    if any(c % 256 for c in args.positions):
        raise SystemExit("--positions must be multiples of 256 (whole image blocks)")
    install()
    threads = args.threads or physical_cores()
    t0 = time.perf_counter()
    info = machine()
    say(f"[kv] {info['cpu']} ({', '.join(info['simd'])}), {threads} thread(s), load average {info['load_start']:.2f}")
    kept = json.loads((args.out / "kv_cache.json").read_text()) if args.part != "all" else {}
    faith, prep = kept.get("faithfulness"), kept.get("prepared")
    if args.part in ("all", "faithfulness"):
        if args.wait_idle:
            wait_for_quiet(args.wait_idle)
        say("[kv] faithfulness on the real Gemma 3 270M ...")
        faith = faithfulness(threads)
    if args.part in ("all", "prepared"):
        if args.wait_idle:
            wait_for_quiet(args.wait_idle)
        say("[kv] prepared study at the 4B shape ...")
        prep = prepared(threads, sorted(args.positions), args.rounds, max(args.tokens, 1))
    info["load_end"] = os.getloadavg()[0]
    command = shlex.join(["python", "-m", "benchmarks.bench_kv", *argv])
    data = {"title": "KV cache precision: f16 vs q8_0", "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": info, "threads": threads,
            "faithfulness": faith, "prepared": prep, "seconds": round(time.perf_counter() - t0, 1)}
    if args.part != "all":  # one part measured now: say when and how the other was
        other = "prepared" if args.part == "faithfulness" else "faithfulness"
        earlier = kept["kept_part"] if (kept.get("kept_part") or {}).get("part") == other else kept
        data["kept_part"] = {"part": other, "command": earlier["command"], "date": earlier["date"]}
    print(write(args.out, data))
    return data


if __name__ == "__main__":
    main()

"""The self-check: does the model on this machine still see and speak as it did where it was made?

The probe: one built-in picture (`probe_picture`, drawn in code at the bundle's image size) with a
short question, and one text-only question. `export` runs it on the exporting machine and stores
the bundle's `selfcheck.json` (pinned in the manifest under "selfcheck" by size and sha256): per
vision file a fingerprint of the picture's image embedding (`fingerprint`) and the top-20 next-token
log-probabilities of the picture prompt; those of the text prompt. `medgemma-edge verify --run` and
`serve` (at start) run the same probe here and compare:

- image embedding: cosine of the fingerprints. Another model's vision file lands near 0;
- next token, text and picture prompt: at the stored top-20 tokens, the largest change of a
  log-probability (sees a flat distribution move) and the KL of the top-20-plus-rest distributions
  (a lower bound of the full KL; sees a peaked one move); and the same top-1 where the stored one
  led by ≥ DECISIVE_GAP. Changed text weights and kernels gone wrong (NaN, garbage) land far above.

A checksum proves a copy whole; this catches a whole file that is the wrong one, and arithmetic
that is wrong on this machine. Bundles without a probe (imported GGUFs, a .gguf opened directly,
bundles exported before probes) record theirs at their first run, in the cache folder (the bundle
folder may be read-only or the user's), keyed by the manifest's sha256, and compare from then on.

Tolerances: the two machines may run other kernels (AVX2 / AVX-512 / VNNI / AMX, repacked weights,
threads). Float kernels only reorder sums; quantized ones may also quantize activations otherwise,
which moved q4_k_m Gemma 3 270M by 0.23 nats (KL 0.0024) between llama.cpp's repacked and plain
kernels, as much as q4_k_m vs f32 (0.21, KL 0.0020); f32/f16/q8_0 files and thread counts moved
nothing. The tolerances are about three times the largest such move (the numbers, and what damage
measured: docs/export.md#the-self-check):

| text weights             | max change of log-prob | KL    | vision file              | min cosine |
|--------------------------|------------------------|-------|--------------------------|------------|
| f32, fp32, f16, bf16     | 0.1 nats               | 0.001 | f32, f16, bf16, onnx-f32 | 0.9999     |
| q8_0, int8, q6_k, q5_k_m | 0.5 nats               | 0.005 | anything else            | 0.999      |
| q4_k_m, int4, other      | 0.75 nats              | 0.01  |                          |            |

On a GPU (the probe is recorded on a CPU) every text tolerance, and the cosine's distance from 1,
is GPU_FACTOR times larger: a margin for half-precision matmuls, not a measurement.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medgemma_edge.runtime.cache import cache_root, read_record, write_record
from medgemma_edge.runtime.errors import BundleError, InputError

PROBE_FILE = "selfcheck.json"
PROBE_FORMAT = 1
RECORDS_DIR = "selfcheck"  # in the cache folder: first-run records, one per manifest sha256
TOP_K = 20
FINGERPRINT_WIDTH = 8  # each image token's embedding projected to 8 numbers: 256 × 8 for MedGemma
IMAGE_QUESTION = "Describe this image."
TEXT_QUESTION = "What is the normal resting heart rate of an adult?"
DECISIVE_GAP = 1.0  # nats: a top-1 leading by this much must stay top-1 (export/quality.DECISIVE_GAP)
FLOAT, EIGHT_BIT, FOUR_BIT = (0.1, 0.001), (0.5, 0.005), (0.75, 0.01)  # (max |Δ log-prob|, KL) in nats
TEXT_TOLERANCE = {"f32": FLOAT, "fp32": FLOAT, "f16": FLOAT, "bf16": FLOAT,
                  **dict.fromkeys(("q8_0", "int8", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1"), EIGHT_BIT)}
VISION_TOLERANCE = {"f32": 0.9999, "f16": 0.9999, "bf16": 0.9999, "onnx-f32": 0.9999}
VISION_TOLERANCE_OTHER = 0.999  # q8_0, onnx-int8, onnx-int8-vnni, and what an imported mmproj may be
GPU_FACTOR = 4.0


def probe_picture(size: int) -> np.ndarray:
    """The built-in picture (size×size×3 uint8): a radiograph-like gradient with a dense disk in
    red, a left-to-right ramp in green, a checkerboard in blue — so swapped channels, a transpose or
    a flip change the embedding too. Pure arithmetic: the same bytes on every machine."""
    y, x = np.mgrid[0:size, 0:size] / size
    disk = ((x - 0.45) ** 2 + (y - 0.55) ** 2 < 0.08).astype(np.float64)
    checker = ((np.floor(x * 16) + np.floor(y * 16)) % 2).astype(np.float64)
    rgb = np.stack([0.2 + 0.5 * y + 0.3 * disk, x, 0.1 + 0.8 * checker], axis=2)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _projection(n_embd: int) -> np.ndarray:
    """(n_embd, FINGERPRINT_WIDTH) of ±1/√n_embd, from SHAKE-256 bits: the same matrix wherever it is
    computed (no random generator whose stream could change between numpy versions)."""
    n = n_embd * FINGERPRINT_WIDTH
    bits = np.unpackbits(np.frombuffer(hashlib.shake_256(b"medgemma-edge selfcheck").digest((n + 7) // 8),
                                       np.uint8))[:n]
    return (bits.astype(np.float64) * 2 - 1).reshape(n_embd, FINGERPRINT_WIDTH) / math.sqrt(n_embd)


def fingerprint(emb: np.ndarray) -> np.ndarray:
    """A random projection of the image embedding (tokens, n_embd) → (tokens · 8,): the cosine of
    two fingerprints estimates that of the full embeddings (on the tiny model 1 − cos came within a
    factor of 3 of the full one, from f16's 6e-8 to a flipped picture's 0.93)."""
    emb = np.asarray(emb, dtype=np.float64)  # (T, H)
    return (emb @ _projection(emb.shape[1])).ravel()  # (T·8,)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def top_logprobs(logprobs: np.ndarray, k: int = TOP_K) -> dict:
    """The k most likely next tokens of full-vocabulary log-probabilities: ids and values, best first."""
    ids = np.argsort(-logprobs, kind="stable")[:k]
    return {"ids": [int(i) for i in ids], "logprobs": [round(float(logprobs[i]), 6) for i in ids]}


def _encode_floats(a: np.ndarray) -> str:
    return base64.b64encode(np.asarray(a, dtype="<f4").tobytes()).decode("ascii")


def _decode_floats(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4").astype(np.float64)


# -- running the probe -------------------------------------------------------------------------
@dataclass
class Measured:
    text: np.ndarray  # log-probs (vocab,) after the text prompt
    image: np.ndarray | None = None  # … after the picture prompt
    vision_key: str | None = None  # the vision file's name
    vision: dict | None = None  # its stored form: path, quant, sha256, finite, fingerprint
    skipped: str | None = None  # why the picture prompt did not run

    def probe(self) -> dict:
        """What a probe or a record keeps of it (JSON)."""
        out = {"text": top_logprobs(self.text), "vision": {}}
        if self.vision_key is not None:
            out["vision"][self.vision_key] = {**self.vision, "logits": top_logprobs(self.image)}
        return out


def _messages(picture=None) -> list[dict]:
    if picture is None:
        return [{"role": "user", "content": TEXT_QUESTION}]
    return [{"role": "user", "content": [{"type": "image", "image": picture},
                                         {"type": "text", "text": IMAGE_QUESTION}]}]


def _next_token(model, messages, encode=None) -> np.ndarray:
    """Log-probs after the prompt, evaluated from an empty cache with images encoded by `encode`:
    neither the image cache nor a saved prefix may answer for the vision file or the weights."""
    from medgemma_edge.runtime import prefill
    from medgemma_edge.runtime.reply import Stats

    prompt = prefill.render(model, messages, think=False, window=None, max_slices=1, fit=None, stats=Stats())
    engine = model.engine
    engine.reserve(len(prompt.ids) + 1, grow=model.auto_context)
    engine.reset()
    pos = 0
    for i, view in enumerate(prompt.views):
        pos = prefill.eval_block(model, prompt, pos, i, encode(view))
    if pos < len(prompt.ids):
        engine.eval_tokens(prompt.ids[pos:])
    return log_softmax(engine.logits())


def measure(model) -> Measured:
    """Run the probe on `model` (holding its lock): the text prompt, and the picture prompt where
    this model takes images here (one image encode: the cost of the check)."""
    with model._serialized():  # one caller at a time, as every Model entry point
        out = Measured(_next_token(model, _messages()))
        if model.vision_path is None:
            return out
        seen = []

        def encode(view):  # fresh, past the image cache, which keys embeddings by the manifest's sha256
            seen.append(model.load_vision().encode(view))
            if seen[-1].shape[0] != model.image_tokens:
                raise BundleError(f"the vision file gave {seen[-1].shape[0]} tokens per image, the manifest says "
                                  f"{model.image_tokens} — it is not this bundle's; copy or export the bundle again")
            return seen[-1]

        try:
            out.image = _next_token(model, _messages(probe_picture(model.image_size)), encode)
        except InputError as err:  # a context fixed shorter than the picture prompt (serve --context 256)
            out.skipped = str(err).split(" — ")[0]
            return out
    emb = seen[0]  # (tokens, n_embd)
    # keyed by the file's name, not its sha256: a file swapped in under that name (manifest rehashed)
    # must meet the reference of the one exported there
    out.vision_key = Path(model.vision_file["path"]).name
    out.vision = {"path": out.vision_key, "quant": model.vision_file.get("quant"),
                  "sha256": model.vision_file.get("sha256"), "finite": bool(np.isfinite(emb).all()),
                  "fingerprint": _encode_floats(fingerprint(emb))}
    return out


# -- comparing ---------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    line: str  # the measured number and its tolerance
    damage: str | None = None  # one line naming what is wrong, when not ok


@dataclass
class SelfCheck:
    checks: list[Check] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)  # parts that had no reference: recorded now
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failure(self) -> str | None:
        """The damage in one line; the first failed check (the image embedding's names the file)."""
        return next((c.damage for c in self.checks if not c.ok), None)

    def lines(self) -> list[str]:
        return ([f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.line}" for c in self.checks]
                + [f"recorded {what}" for what in self.recorded] + self.notes)


@dataclass(frozen=True)
class Tolerance:
    logprob: float  # max |Δ log-prob| at the stored top-k, nats
    kl: float  # KL of the top-k-plus-rest distributions, nats
    cosine: float  # min cosine of the image-embedding fingerprints


def tolerances(model) -> Tolerance:
    """The tolerances for this model's text quant and vision file, on the device it runs on."""
    quant = str((model.manifest.get("quantization") or {}).get("text") or "").lower()
    logprob, kl = TEXT_TOLERANCE.get(quant, FOUR_BIT)
    vq = str((model.vision_file or {}).get("quant") or "").lower()
    cosine = VISION_TOLERANCE.get(vq, VISION_TOLERANCE_OTHER)
    if _on_gpu(model):
        logprob, kl, cosine = logprob * GPU_FACTOR, kl * GPU_FACTOR, 1 - (1 - cosine) * GPU_FACTOR
    return Tolerance(logprob, kl, cosine)


def _on_gpu(model) -> bool:
    if getattr(model.engine, "device", None) == "cuda":  # the ONNX engine knows its provider
        return True
    if model.manifest["backend"] != "gguf" or model.device == "cpu":
        return False
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())  # device auto/cuda offloads every layer then


@dataclass(frozen=True)
class Origin:
    """Where a reference came from: the export's probe, or this machine's first-run record."""
    name: str  # "the export's probe"
    made: str  # "exported" | "recorded"


EXPORTED = Origin("the export's probe", "exported")
RECORDED = Origin("the record of this bundle's first run on this machine", "recorded")


def compare_embedding(ref: dict, now: dict, tol: float, origin: Origin) -> Check:
    a, b = _decode_floats(ref["fingerprint"]), _decode_floats(now["fingerprint"])
    norms = float(np.linalg.norm(a) * np.linalg.norm(b)) if a.shape == b.shape else 0.0
    cos = float(a @ b / norms) if norms > 0 and now["finite"] and np.isfinite(norms) else float("nan")
    ok = cos >= tol  # False for NaN
    damage = None if ok else (
        f"the image embedding does not match {origin.name} (cosine {cos:.4f} < {tol:g}): the vision file "
        f"{now['path']} is not the one {origin.made} with this text model, or this CPU's kernels "
        "misbehave — copy the bundle again or re-export it, then `medgemma-edge verify --run`")
    return Check("image embedding", ok, f"cosine {cos:.6f} (tolerance ≥ {tol:g})", damage)


def coarse_kl(ref_ids, ref_logprobs, now: np.ndarray) -> float:
    """KL(reference ‖ now) over the reference's top-k tokens plus one bin for all the rest: a lower
    bound of the full KL, computable from what a probe stores."""
    p, q = np.exp(np.asarray(ref_logprobs)), np.exp(now[ref_ids])
    rest_p, rest_q = max(1 - p.sum(), 1e-12), max(1 - q.sum(), 1e-12)
    return max(0.0, float((p * (np.asarray(ref_logprobs) - now[ref_ids])).sum() + rest_p * np.log(rest_p / rest_q)))


def compare_logits(name: str, ref: dict, now: np.ndarray, tol: Tolerance, origin: Origin, piece=None) -> Check:
    """`now`: the full log-probs measured here; compared at the reference's top-k tokens."""
    ids, want = ref["ids"], np.asarray(ref["logprobs"])
    finite = bool(np.isfinite(now).all()) and max(ids) < now.size
    delta = float(np.max(np.abs(now[ids] - want))) if finite else float("inf")
    kl = coarse_kl(ids, want, now) if finite else float("inf")
    gap = float(want[0] - want[1]) if len(ids) > 1 else float("inf")
    top_now = int(np.argmax(now))
    decisive, same = gap >= DECISIVE_GAP, top_now == ids[0]
    ok = delta <= tol.logprob and kl <= tol.kl and (same or not decisive)
    top = f"top-1 {_tok(piece, ids[0])} " + ("kept" if same else f"now {_tok(piece, top_now)}") + \
        ("" if decisive else f" (not decisive: it led by {gap:.3f})")
    measured = f"max |Δ log-prob| {delta:.4f} (≤ {tol.logprob:g}), KL {kl:.2e} (≤ {tol.kl:g}) nats"
    cause = ("the text weights changed or the picture reaches the text model differently" if "picture" in name
             else "the text weights changed")
    damage = None if ok else (
        f"next-token logits of the {name} differ from {origin.name} ({measured}; {top}): {cause}, or this "
        "CPU's kernels misbehave — copy the bundle again or re-export it")
    return Check(f"next token, {name}", ok, f"{measured} over the top-{len(ids)}; {top}", damage)


def _tok(piece, token: int) -> str:
    try:
        return repr(piece(token)) if piece is not None else f"#{token}"
    except Exception:  # a piece that does not decode: its id says enough
        return f"#{token}"


# -- references: the bundle's probe, else this machine's record --------------------------------
def read_probe(model) -> dict | None:
    """The bundle's probe (manifest "selfcheck"; verify checked its sha256 with the other files), or
    None for a bundle without one."""
    entry = model.manifest.get("selfcheck")
    if not entry or model.in_memory:
        return None
    try:
        probe = json.loads((model.bundle / entry["path"]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"the bundle's {entry['path']} cannot be read ({type(err).__name__}) "
                          "— copy the bundle again") from None
    return probe if probe.get("format") == PROBE_FORMAT else None  # a newer probe: treated as none


def record_path(model) -> Path | None:
    try:
        folder = cache_root() / RECORDS_DIR
        folder.mkdir(exist_ok=True)
    except OSError:
        return None
    return folder / f"{model.manifest_sha256}.json"


def stamp(probe: dict) -> dict:
    """A probe or record as stored: its format, when and on what kind of CPU it was measured."""
    from medgemma_edge.runtime.vision_choice import export_machine

    return {"format": PROBE_FORMAT, "top_k": TOP_K, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": export_machine(), "prompts": {"text": TEXT_QUESTION, "picture": IMAGE_QUESTION}, **probe}


def _logits_ok(ref) -> bool:
    return (isinstance(ref, dict) and isinstance(ref.get("ids"), list) and isinstance(ref.get("logprobs"), list)
            and 0 < len(ref["ids"]) == len(ref["logprobs"]) and all(isinstance(i, int) and i >= 0 for i in ref["ids"]))


def _reference(probe: dict, record: dict, part: str, key: str | None = None):
    """(reference, origin) of one part: the export's probe first, else this machine's record;
    (None, None) when neither holds a usable one."""
    for source, origin in ((probe, EXPORTED), (record, RECORDED)):
        ref = source.get(part)
        if key is not None:
            ref = ref.get(key) if isinstance(ref, dict) else None
            usable = isinstance(ref, dict) and isinstance(ref.get("fingerprint"), str) and _logits_ok(ref.get("logits"))
        else:
            usable = _logits_ok(ref)
        if usable:
            return ref, origin
    return None, None


def run(model) -> SelfCheck:
    """Run the probe on `model` and compare it with the bundle's probe, else with this machine's
    record of the bundle's first run; parts with neither are recorded now (and said so)."""
    t0 = time.perf_counter()
    now = measure(model)
    probe, path = read_probe(model) or {}, record_path(model)
    record = read_record(path) if path is not None else {}
    record = record if record.get("format") == PROBE_FORMAT else {}
    tol = tolerances(model)
    piece = lambda t: model.engine.piece(t, special=True).decode("utf-8", "replace")  # noqa: E731
    out, fresh, missing = SelfCheck(), now.probe(), {}
    if not np.isfinite(now.text).all() or (now.image is not None and not np.isfinite(now.image).all()):
        out.checks.append(Check("finite logits", False, "NaN or infinite next-token logits", (
            "the model gives NaN or infinite next-token logits on this machine: its kernels misbehave or a "
            "file is damaged — copy the bundle again, or try --device cpu")))
    vref = vorigin = None
    if now.vision_key is not None:
        vref, vorigin = _reference(probe, record, "vision", now.vision_key)
        if vref is None:
            missing["vision"] = fresh["vision"]
            out.recorded.append(f"image embedding and picture prompt ({now.vision['path']})")
        else:
            out.checks.append(compare_embedding(vref, now.vision, tol.cosine, vorigin))
    tref, torigin = _reference(probe, record, "text")
    if tref is None:
        missing["text"] = fresh["text"]
        out.recorded.append("text prompt")
    else:
        out.checks.append(compare_logits("text prompt", tref, now.text, tol, torigin, piece))
    if vref is not None:
        out.checks.append(compare_logits("picture prompt", vref["logits"], now.image, tol, vorigin, piece))
    if missing and out.ok:  # never record a run that failed: the damage would pass from then on
        vision = record.get("vision") if isinstance(record.get("vision"), dict) else {}
        kept = {"text": missing.get("text", record.get("text")), "vision": {**vision, **missing.get("vision", {})}}
        if path is not None and write_record(path, stamp(kept)):
            out.notes.append(f"recorded parts are compared from the next run on ({path})")
        else:
            out.notes.append("the record could not be written (no writable cache folder): nothing to compare with")
    elif missing:
        out.recorded.clear()
        out.notes.append("nothing recorded: a run that fails is no reference")
    if now.skipped or (model.vision_path is None and model.image_token_id is not None):
        out.notes.append(f"images not checked: {now.skipped or model.no_vision or 'no vision file'}")
    out.seconds = round(time.perf_counter() - t0, 2)
    return out


def check_or_raise(model, say=None) -> SelfCheck:
    """`run`, each line given to say(line); BundleError with the damage in one line when a check fails."""
    result = run(model)
    for line in result.lines() if say is not None else ():
        say(line)
    if not result.ok:
        raise BundleError(result.failure)
    return result


def summary(result: SelfCheck) -> str:
    done = "passed" if result.checks else "recorded (nothing to compare with yet)"
    return f"{done} in {result.seconds:.1f} s"

"""Whether an answer is decoded speculatively (runtime/speculative.py), and with which drafters:
`load(speculative="auto" | "on" | "off", draft_model=None)`, `--speculative`, `--draft-model`.

auto: on where this kind of CPU measured a gain over plain decoding (MEASURED_GAIN, from
benchmarks/results/speculative.json and the other kinds' runs in benchmarks/results/KIND/;
tests/test_speculative.py keeps them in step), for the
model's size (measured on Gemma 3 270M; projected at MedGemma 4B's shape from its measured batch
costs) and the kind of answer (free text; JSON or a grammar), or where the caller named a draft
model; off elsewhere and on ONNX bundles (their decoder returns the last position's logits only).

Speculative decoding runs llama.cpp's attention with flash attention: its kernel gives a position
the same logits whether it is evaluated alone or in a batch, which the unfused kernel does not
(measured on Gemma 3 270M: logits up to 1.8 apart), so guesses verified in a batch pick exactly
the tokens plain decoding with the same engine picks. What flash attention itself moves against
the unfused default: benchmarks/results/KV_CACHE.md and SPECULATIVE.md.
"""

from __future__ import annotations

from medgemma_edge.runtime.errors import InputError

MODES = ("auto", "on", "off")
# Gain of speculative decoding over our plain default, greedy, per kind of CPU (runtime/vision_choice
# .cpu_kind), by `python -m benchmarks.bench_speculative`: per size of model ("small": measured on
# Gemma 3 270M, "large": projected at the 4B shape) and answer ("…_json": held to a schema). A kind
# not listed was not measured: auto stays off there.
MEASURED_GAIN: dict[str, dict[str, float]] = {
    "vnni": {"small": 1.21, "small_json": 1.21, "large": 1.01, "large_json": 1.11},  # benchmarks/results/
    "avx2": {"small": 1.2, "small_json": 1.22, "large": 1.1, "large_json": 1.13},  # benchmarks/results/avx2/
}
LARGE_BYTES = 1_000_000_000  # a text file at least this big counts as "large" (4B q4_k_m: 2.5 GB; 270M: 0.25 GB)
ANSWERS = ("text", "grammar")
HELP = ("speculative decoding: tokens guessed from the prompt and the answer so far (and a --draft-model), "
        "checked by the model in one batch; same answer, faster where guesses hit. auto: on where this kind "
        "of CPU measured a gain (benchmarks/results/SPECULATIVE.md) or a draft model is named")


def size_class(bundle, manifest: dict) -> str:
    """"small" or "large", from the size of the bundle's text weights."""
    import os

    text = next(f for f in manifest["files"] if f["role"] == "text")
    try:
        size = text.get("size") or os.path.getsize(os.path.join(bundle, text["path"]))
    except OSError:
        size = 0
    return "large" if size >= LARGE_BYTES else "small"


def wanted(mode, draft_model, backend: str, flags: set[str] | None = None, size: str = "large") -> frozenset:
    """The kinds of answer ("text", "grammar") to decode speculatively, empty for none; InputError,
    one line, for what cannot be done."""
    from medgemma_edge.runtime.vision_choice import cpu_flags, cpu_kind

    if mode not in MODES:
        raise InputError(f"unknown speculative mode {mode!r:.20} — use auto, on or off")
    if mode == "off":
        if draft_model is not None:
            raise InputError("a draft model with speculative decoding off — drop --draft-model, or turn it on")
        return frozenset()
    if backend != "gguf":
        if mode == "on" or draft_model is not None:
            raise InputError("speculative decoding needs llama.cpp's engine (a GGUF bundle); an ONNX bundle's "
                             "decoder returns only the last position — use --speculative off")
        return frozenset()
    if mode == "on" or draft_model is not None:
        return frozenset(ANSWERS)
    gains = MEASURED_GAIN.get(cpu_kind(cpu_flags() if flags is None else flags), {})
    return frozenset(a for a, key in zip(ANSWERS, (size, f"{size}_json")) if (gains.get(key) or 0) > 1)


class Speculation:
    """One model's speculative setup: on or off, the draft model (opened at load, closed by `close`
    when the model is unloaded and opened again with the next answer), guesses per batch."""

    def __init__(self, on: frozenset, draft_path=None, threads: int | None = None, k: int | None = None):
        from medgemma_edge.runtime.speculative import DEFAULT_DRAFT

        self.on, self.draft_path, self.threads, self.k = on, draft_path, threads, k or DEFAULT_DRAFT
        self.draft = None

    @classmethod
    def open(cls, on: frozenset, draft_model, engine, threads: int | None) -> "Speculation":
        spec = cls(on, draft_model if on else None, threads)
        spec._open_draft(engine)  # a draft that does not fit the model is refused at load
        return spec

    def _open_draft(self, engine) -> None:
        if self.draft is None and self.draft_path is not None:
            from medgemma_edge.runtime.drafters import DraftModel

            self.draft = DraftModel.open(self.draft_path, engine, threads=self.threads)

    def lookahead(self, engine, grammar=None):
        """A Lookahead for one answer (runtime/speculative.py), or None to decode plainly."""
        if ("grammar" if grammar is not None else "text") not in self.on:
            return None
        from medgemma_edge.runtime import drafters
        from medgemma_edge.runtime.speculative import Lookahead, supports

        if not supports(engine):
            return None
        self._open_draft(engine)
        if grammar is None:
            return Lookahead(engine, drafters.Chain(drafters.PromptLookup(), self.draft), self.k)
        # held to a grammar: the text it forces, then a draft model's guess; no prompt lookup, whose
        # n-grams inside free values (digits, units) were mostly refused and cost more rows than they
        # saved (lab-report JSON on Gemma 3 270M, benchmarks/results/SPECULATIVE.md)
        chain = drafters.Chain(drafters.ForcedText(grammar, engine), drafters.Grammatical(self.draft, grammar))
        return Lookahead(engine, chain, self.k)

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
            self.draft = None

"""Whether an answer is decoded speculatively (runtime/speculative.py), and with which drafters:
`load(speculative="auto" | "on" | "off", draft_model=None)`, `--speculative`, `--draft-model`.

auto: on where this kind of CPU measured a gain over plain decoding (MEASURED_GAIN, from
benchmarks/results/speculative.json; tests/test_speculative.py keeps the two in step), or where the
caller named a draft model; off elsewhere and on ONNX bundles (their decoder returns the last
position's logits only).

Speculative decoding runs llama.cpp's attention with flash attention: its kernel gives a position
the same logits whether it is evaluated alone or in a batch, which the unfused kernel does not
(measured on Gemma 3 270M: logits up to 1.8 apart), so guesses verified in a batch pick exactly
the tokens plain decoding with the same engine picks. What flash attention itself moves against
the unfused default: benchmarks/results/KV_CACHE.md and SPECULATIVE.md.
"""

from __future__ import annotations

from medgemma_edge.runtime.errors import InputError

MODES = ("auto", "on", "off")
# Median gain of prompt-lookup speculative decoding over our plain default, greedy, per kind of CPU
# (runtime/vision_choice.cpu_kind), measured by `python -m benchmarks.bench_speculative`; None: not
# measured on that kind, so auto stays off there.
MEASURED_GAIN = {"vnni": None, "avx2": None, "other": None}
HELP = ("speculative decoding: tokens guessed from the prompt and the answer so far (and a --draft-model), "
        "checked by the model in one batch; same answer, faster where guesses hit. auto: on where this kind "
        "of CPU measured a gain (benchmarks/results/SPECULATIVE.md) or a draft model is named")


def wanted(mode, draft_model, backend: str, flags: set[str] | None = None) -> bool:
    """Whether to decode speculatively; InputError, one line, for what cannot be done."""
    from medgemma_edge.runtime.vision_choice import cpu_flags, cpu_kind

    if mode not in MODES:
        raise InputError(f"unknown speculative mode {mode!r:.20} — use auto, on or off")
    if mode == "off":
        if draft_model is not None:
            raise InputError("a draft model with speculative decoding off — drop --draft-model, or turn it on")
        return False
    if backend != "gguf":
        if mode == "on" or draft_model is not None:
            raise InputError("speculative decoding needs llama.cpp's engine (a GGUF bundle); an ONNX bundle's "
                             "decoder returns only the last position — use --speculative off")
        return False
    if mode == "on" or draft_model is not None:
        return True
    gain = MEASURED_GAIN.get(cpu_kind(cpu_flags() if flags is None else flags))
    return gain is not None and gain > 1


class Speculation:
    """One model's speculative setup: on or off, the draft model (opened at load, closed by `close`
    when the model is unloaded and opened again with the next answer), guesses per batch."""

    def __init__(self, on: bool, draft_path=None, threads: int | None = None, k: int | None = None):
        from medgemma_edge.runtime.speculative import DEFAULT_DRAFT

        self.on, self.draft_path, self.threads, self.k = on, draft_path, threads, k or DEFAULT_DRAFT
        self.draft = None

    @classmethod
    def open(cls, on: bool, draft_model, engine, threads: int | None) -> "Speculation":
        spec = cls(on, draft_model if on else None, threads)
        spec._open_draft(engine)  # a draft that does not fit the model is refused at load
        return spec

    def _open_draft(self, engine) -> None:
        if self.draft is None and self.draft_path is not None:
            from medgemma_edge.runtime.drafters import DraftModel

            self.draft = DraftModel.open(self.draft_path, engine, threads=self.threads)

    def lookahead(self, engine, grammar=None):
        """A Lookahead for one answer (runtime/speculative.py), or None to decode plainly."""
        if not self.on:
            return None
        from medgemma_edge.runtime import drafters
        from medgemma_edge.runtime.speculative import Lookahead, supports

        if not supports(engine):
            return None
        self._open_draft(engine)
        forced = drafters.ForcedText(grammar, engine) if grammar is not None else None
        return Lookahead(engine, drafters.Chain(forced, drafters.PromptLookup(), self.draft), self.k)

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
            self.draft = None

"""The interface every measured system implements, and the registry the harness builds them from.

A backend is one way a user could run MedGemma on this machine (ours, llama.cpp driven directly,
transformers). The harness asks every one the same things, each in a fresh process:

    preprocess(kind, path)  a zero-argument function that turns one input file into what the model
                            takes (None: this backend cannot read that kind of input)
    imports()               import the libraries (timed apart from load)
    load()                  bundle / checkpoint -> ready to answer an image question
    ask(case)               first question with one image: image_encode_s, prefill_tok_s,
                            decode_tok_s, ttft_s (and whatever else it can tell)
    follow_up(case)         a second question in the same conversation, on the same image:
                            ttft_s (None when the backend keeps no conversation)
    text_only(case)         a text prompt of about the same length: prefill_tok_s, decode_tok_s
                            (entries that measure the text model only)

Adding a backend is one class here or in its own module, one line in KINDS, and one Spec in
benchmarks.run's list.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import asdict, dataclass, field

SYSTEM = "You are an expert radiologist."
QUESTION = ("Describe the findings on this chest X-ray in a structured report. Comment on the lungs, "
            "the pleural spaces, the heart size and mediastinal contours, the bones and soft tissues, "
            "and any lines or tubes. Compare both sides and state whether anything needs urgent attention.")
FOLLOW_UP = "Is there any sign of a pneumothorax?"


@dataclass
class Spec:
    """One entry of the report: which backend class, on which files, measuring what."""
    name: str  # shown in the report, e.g. "ours q4_k_m"
    kind: str  # key of KINDS
    options: dict = field(default_factory=dict)  # passed to the class: files, dtype, ...
    image: bool = True  # ask/follow_up with an image; False: text_only
    preprocess: bool = False  # run its preprocessing on every input kind
    model: bool = True  # False: preprocessing only (no model phase)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Case:
    """What every backend is asked; the same for all, so the numbers compare."""
    image: str  # the PNG X-ray every backend can read
    decode_tokens: int
    text_prompt_words: int  # text-only prompt length in words (~1.3 tokens each)
    threads: int
    context: int = 4096  # the runtime's default, which sets the KV cache size (and RSS)
    system: str = SYSTEM
    question: str = QUESTION
    follow_up: str = FOLLOW_UP

    def text_prompt(self) -> str:
        words = (self.question + " ").split()
        return " ".join(words[i % len(words)] for i in range(self.text_prompt_words))


class Backend:
    needs_load_to_preprocess = False  # llama.cpp's own preprocessing lives in its loaded vision context

    def imports(self) -> None:
        """Import the libraries `load` needs (timed apart: import time is not model loading)."""

    def preprocess(self, kind: str, path: str):
        return None

    def load(self) -> None:
        raise NotImplementedError

    def ask(self, case: Case) -> dict:
        raise NotImplementedError

    def follow_up(self, case: Case) -> dict | None:
        return None

    def text_only(self, case: Case) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass


KINDS = {
    "ours": "benchmarks.backend_runtime:RuntimeBackend",
    "ours-variant": "benchmarks.bench_repack:OursVariant",  # load() options a user cannot pass
    "llama.cpp": "benchmarks.backend_llamacpp:LlamaCppBackend",
    "transformers": "benchmarks.backend_transformers:TransformersBackend",
    "floor": "benchmarks.backend_floor:FloorBackend",
    "genai": "benchmarks.backend_genai:GenaiBackend",
}


def build(spec: Spec) -> Backend:
    module, cls = KINDS[spec.kind].split(":")
    return getattr(importlib.import_module(module), cls)(**spec.options)


def say(*parts) -> None:
    """Progress line on stderr (the report goes to files, progress to the terminal)."""
    print(*parts, file=sys.stderr, flush=True)

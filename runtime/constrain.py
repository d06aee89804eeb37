"""Constrained decoding: answers that are valid JSON for a schema (or follow any GBNF grammar).

The grammar is llama.cpp's own: `llama_cpp.llama_grammar.json_schema_to_gbnf` turns the JSON
schema into GBNF, and `llama_sampler_init_grammar` runs it against the vocabulary. Our decode loop
samples in numpy (runtime/generate.py), so the grammar is applied to the step's logits through a
`llama_token_data_array` that views a numpy structured array of the same layout, and each chosen
token is fed back with `llama_sampler_accept`. Only a vocabulary pointer is needed, so this works
for a GGUF bundle (the model's vocab) and an ONNX bundle (its vocab-only tokenizer GGUF) alike.

Cost: applying the grammar to all 262k candidates is one pass over the vocabulary, asking about one
token a single lookup, so a step asks about single tokens first (runtime/generate.choose_token):
greedy tries the best tokens in order, sampling draws from the free distribution until a draw is
allowed — rejection sampling, which is exactly a draw from the distribution restricted to the
allowed tokens — and the whole vocabulary is masked only when every try is refused. With top_k /
top_p the free distribution is truncated before the grammar restricts it (llama.cpp's common
sampler does the same on its first try).

What the grammar cannot enforce (json_schema_to_gbnf's limits): numeric minimum / maximum, string
formats beyond date / time / uuid, `not`, remote `$ref`s. A string without maxLength and an array
without maxItems can run until max_new_tokens, and an answer cut there is not complete JSON
(finish_reason "length"): give bounds in the schema and enough tokens.
"""

from __future__ import annotations

import copy
import ctypes
import json
import re

import numpy as np

from medgemma_edge.runtime.errors import InputError

THOUGHT_OPEN, THOUGHT_CLOSE = "<unused94>", "<unused95>"  # runtime/chat.py's thought markers
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data (llama.h)

# json_schema_to_gbnf (llama-cpp-python 0.3.x) lets raw control characters (a newline) into
# strings, which is not JSON; upstream llama.cpp's converter has since excluded them. Same rule as
# upstream's json-schema-to-grammar.py.
_LOOSE_CHAR = re.compile(r'^char ::= \[\^"\\\\\] ', re.MULTILINE)
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] '  # GBNF text: [^"\\\x7F\x00-\x1F]


def parse_schema(text, name: str = "the JSON schema") -> dict:
    """A JSON schema object from its JSON text (a dict passes through); InputError in one line."""
    if isinstance(text, (str, bytes)):
        try:
            text = json.loads(text)
        except ValueError as err:
            raise InputError(f"{name} is not valid JSON ({err}) — check the file") from None
    if not isinstance(text, dict):
        raise InputError(f"a JSON schema must be a JSON object, got {type(text).__name__}")
    return text


def schema_to_gbnf(schema) -> str:
    """GBNF for a JSON schema (a dict, or its JSON text); InputError if it cannot be used."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if isinstance(schema, (str, bytes)) or not isinstance(schema, dict):
        schema = parse_schema(schema)
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        why = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise InputError(f"this JSON schema cannot be turned into a grammar ({why}) — use types, properties, "
                         "required, items, enum, const, anyOf and local $refs") from None
    return _LOOSE_CHAR.sub(lambda _: _STRICT_CHAR, gbnf)


def rename_root(gbnf: str, name: str) -> str:
    """The grammar with its `root` rule called `name`, to embed it in a larger grammar (the
    converter never refers to root from another rule: a `$ref` to "#" is refused)."""
    return re.sub(r"^root ::=", f"{name} ::=", gbnf, count=1, flags=re.MULTILINE)


def with_thought(gbnf: str) -> str:
    """The grammar preceded by an optional `<unused94>…<unused95>` thought (MedGemma 1.5 thinking):
    the thought is free text without '<', the answer after it follows the grammar."""
    return (rename_root(gbnf, "answer") + f'\nroot ::= ("{THOUGHT_OPEN}" thought-text "{THOUGHT_CLOSE}")? answer'
            '\nthought-text ::= [^<]*')


def grammar_for(json_schema=None, grammar: str | None = None, think: bool = False) -> str | None:
    """The GBNF a request asks for (a JSON schema or a grammar, not both); None: unconstrained."""
    if json_schema is not None and grammar is not None:
        raise InputError("give a JSON schema or a grammar, not both")
    if json_schema is not None:
        gbnf = schema_to_gbnf(json_schema)
    elif grammar is not None:
        if not isinstance(grammar, str) or "root" not in grammar:
            raise InputError("a grammar must be GBNF text with a `root` rule")
        gbnf = grammar
    else:
        return None
    return with_thought(gbnf) if think else gbnf


def vocab_pointer(engine):
    """The llama_vocab pointer of a text engine: LlamaEngine holds it, the ONNX engine's vocabulary
    (runtime/backends/llama_vocab.LlamaVocab) holds it one level down."""
    vocab = engine.vocab
    return getattr(vocab, "vocab", vocab)


class Constraint:
    """One grammar for one answer: `mask(logits)`, `allows(token)`, `accept(token)`, `close()`.

    Never `accept` a token the grammar refuses: llama.cpp aborts the process on it.
    """

    def __init__(self, vocab, gbnf: str):
        import llama_cpp

        self._c = llama_cpp
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not self._sampler:
            raise InputError("llama.cpp could not parse the grammar (its log names the line) — check the GBNF")
        self._all = np.zeros(self.n_vocab, dtype=TOKEN_DATA)  # (n_vocab,) reused every step
        self._all["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self._one = np.zeros(1, dtype=TOKEN_DATA)

    def copy(self) -> "Constraint":
        """A Constraint at this one's state, to probe ahead without moving this one (runtime/drafters
        .ForcedText): a clone of llama.cpp's grammar sampler, the scratch arrays shared."""
        other = copy.copy(self)
        other._sampler = self._c.llama_sampler_clone(self._sampler)
        return other

    def _apply(self, cells: np.ndarray) -> None:
        data = ctypes.cast(cells.ctypes.data, ctypes.POINTER(self._c.llama_token_data))
        array = self._c.llama_token_data_array(data=data, size=len(cells), selected=-1, sorted=False)
        self._c.llama_sampler_apply(self._sampler, ctypes.byref(array))

    def allows(self, token: int) -> bool:
        if not 0 <= token < self.n_vocab:
            return False
        self._one[0] = (token, 0.0, 0.0)
        self._apply(self._one)
        return bool(np.isfinite(self._one["logit"][0]))

    def allowed(self, tokens: np.ndarray) -> np.ndarray:
        """Which of `tokens` (ids in the vocabulary) the grammar allows next: one pass over them."""
        cells = np.zeros(len(tokens), dtype=TOKEN_DATA)
        cells["id"] = tokens
        self._apply(cells)
        return np.isin(tokens, cells["id"][np.isfinite(cells["logit"])])  # by id, should llama.cpp reorder

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """float32 logits with every token the grammar refuses at -inf (rows past the vocabulary too)."""
        cells = self._all
        cells["id"] = np.arange(self.n_vocab, dtype=np.int32)  # llama.cpp may not reorder, but be sure
        cells["logit"] = logits[:self.n_vocab]
        cells["p"] = 0.0
        self._apply(cells)
        out = np.full(len(logits), -np.inf, dtype=np.float32)
        out[cells["id"]] = cells["logit"]
        if not np.isfinite(out).any():
            raise InputError("the grammar allows no next token (a schema that no text can satisfy?) — "
                             "check the schema")
        return out

    def accept(self, token: int) -> None:
        self._c.llama_sampler_accept(self._sampler, int(token))

    def close(self) -> None:
        if self._sampler:
            self._c.llama_sampler_free(self._sampler)
            self._sampler = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

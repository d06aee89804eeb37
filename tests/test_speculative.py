"""Speculative decoding is exact: guessed tokens checked in batches change nothing in the answer.

Greedy answers with every drafter (prompt lookup, a draft model) are token for token the answers of
plain decoding on the same engine (flash attention on, as speculative decoding runs it), on the real
Gemma 3 270M and on the tiny random model (whose near-ties make any batch-dependent arithmetic
show). Sampling keeps the model's distribution: the accept/reject rule on one step, and whole
three-token answers of a small Markov "model", against the exact probabilities (chi-square).
"""

import numpy as np
import pytest

from medgemma_edge.runtime import drafters, generate as gen, speculative as spec, spec_choice
from medgemma_edge.runtime.errors import InputError

PROMPTS = [
    "Write a radiology report for a normal chest X-ray with the sections FINDINGS and IMPRESSION.",
    "Repeat exactly: The heart size is normal. The lungs are clear. No pleural effusion. No pneumothorax.",
    "Sodium 140 mmol/L, potassium 4.1 mmol/L, chloride 102 mmol/L, glucose 5.4 mmol/L. List them as a table.",
    "Explain in two sentences what a pleural effusion is.",
    'Give the findings as JSON with keys "organ" and "finding": liver normal, spleen enlarged, kidneys normal.',
]
N_TOKENS = 64
ALL = frozenset(spec_choice.ANSWERS)  # speculative for every kind of answer (Speculation.on)


def _engine(path):
    from medgemma_edge.runtime.backends.llama_engine import LlamaEngine

    return LlamaEngine(str(path), n_ctx=1024, threads=2, flash_attn=True)


def _answer(engine, prompt: str, look=None, sampling=None) -> list[int]:
    engine.reset()
    engine.eval_tokens(engine.tokenize(f"<bos><start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"))
    vocab = gen.Vocabulary(frozenset(engine.end_ids()), frozenset())
    s = sampling or gen.Sampling(max_new_tokens=N_TOKENS)
    return [st.token for st in gen.decode(engine, s, vocab, None, look) if st.token is not None]


def _same_as_plain(engine, *make_drafters) -> list[spec.SpecStats]:
    """Each drafter's greedy answers, token for token plain decoding's, PROMPTS each; their stats."""
    totals = [spec.SpecStats() for _ in make_drafters]
    for prompt in PROMPTS:
        plain = _answer(engine, prompt)
        for make, total in zip(make_drafters, totals):
            look = spec.Lookahead(engine, make(), spec.DEFAULT_DRAFT)
            fast = _answer(engine, prompt, look)
            first = next((i for i, (a, b) in enumerate(zip(plain, fast)) if a != b), min(len(plain), len(fast)))
            assert fast == plain, (f"{prompt[:30]!r}: speculative answer leaves plain decoding at token {first} "
                                   f"of {len(plain)} (plain {plain[first:first + 3]}, speculative "
                                   f"{fast[first:first + 3]})")
            assert engine.n_past == len(engine.cached)  # no unconfirmed guess left in the cache
            for f in ("batches", "drafted", "accepted"):
                setattr(total, f, getattr(total, f) + getattr(look.stats, f))
    for total in totals:
        print(f"{total.drafted} guessed, {total.accepted} accepted ({total.acceptance:.0%}) in {total.batches} "
              "batches")
    return totals


@pytest.fixture(scope="module")
def gemma(gemma270m_gguf):
    engine = _engine(gemma270m_gguf)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_bundle_f32):
    import json

    files = json.loads((tiny_bundle_f32 / "manifest.json").read_text())["files"]
    return tiny_bundle_f32 / next(f["path"] for f in files if f["role"] == "text")


def test_both_drafters_greedy_is_plain_greedy_on_gemma_270m(gemma, gemma270m_gguf):
    draft = drafters.DraftModel.open(gemma270m_gguf, gemma, threads=2)  # itself as draft: most guesses hit
    try:
        lookup, drafted = _same_as_plain(gemma, drafters.PromptLookup, lambda: draft)
    finally:
        draft.close()
    assert lookup.accepted > 20 and drafted.acceptance > 0.5  # the guesses were really used, not all refused


def test_both_drafters_greedy_is_plain_greedy_on_the_tiny_model(tiny_gguf):
    engine = _engine(tiny_gguf)
    draft = drafters.DraftModel.open(tiny_gguf, engine, threads=2)
    try:
        lookup, drafted = _same_as_plain(engine, drafters.PromptLookup, lambda: draft)
    finally:
        draft.close()
        engine.close()
    assert lookup.accepted > 0 and drafted.accepted > 0


def test_a_draft_with_another_vocabulary_is_refused_in_one_line(gemma, tiny_gguf):
    class Vocab:  # a vocabulary 200 entries larger than the model's
        n_vocab, vocab = gemma.n_vocab + 200, gemma.vocab

    with pytest.raises(InputError, match="share the vocabulary"):
        drafters.check_vocabularies(gemma, Vocab(), "other.gguf")
    tiny = _engine(tiny_gguf)  # MedGemma's tokenizer (image token and all): Gemma 3 270M may draft for it
    try:
        drafters.check_vocabularies(tiny, gemma, "gemma-3-270m.gguf")
        print(f"vocabularies: MedGemma-shaped {tiny.n_vocab}, Gemma 3 270M {gemma.n_vocab}: compatible")
    finally:
        tiny.close()


def test_prompt_lookup_guesses_what_followed_the_latest_match():
    d = drafters.PromptLookup(max_n=3, min_n=1)
    assert d.draft([1, 2, 3, 4, 5, 9, 2, 3], 2) == [4, 5]  # "2 3" seen before, then 4 5
    assert d.draft([1, 2, 3, 4, 1, 2, 3, 7, 1, 2, 3], 3) == [7, 1, 2]  # the latest of two matches
    assert d.draft([("img", "d", 0), 5, 6, ("img", "d", 1), 5], 4) == [6]  # stops at an image position
    assert d.draft([1, 2, 3], 4) == []


def test_forced_text_and_grammar_cut_guesses_on_gemma_270m(gemma):
    """ForcedText guesses a key the schema forces without its closing quote (the model writes it
    merged with the colon); Grammatical cuts another drafter's guess at the first refused token."""
    from medgemma_edge.runtime import constrain

    schema = {"type": "object", "properties": {"reference_range": {"type": "string"}},
              "required": ["reference_range"]}
    grammar = constrain.Constraint(gemma.vocab, constrain.schema_to_gbnf(schema))
    try:
        for tok in gemma.tokenize('{"', special=False):
            grammar.accept(tok)
        forced = drafters.ForcedText(grammar, gemma).draft([], 8)
        text = b"".join(gemma.piece(t) for t in forced).decode()
        assert text == "reference_range", f"forced text guessed {text!r}"
        assert forced == gemma.tokenize('reference_range"', special=False)[:-1]

        ref, flag = gemma.tokenize("reference", special=False), gemma.tokenize("flag", special=False)

        class Fixed:
            def draft(self, history, k):
                return (ref + flag)[:k]

        cut = drafters.Grammatical(Fixed(), grammar).draft([], 8)
        assert cut == ref, f"grammar cut the guess to {cut}, expected {ref}"
        assert drafters.Grammatical(None, grammar).draft([], 8) == []
        assert grammar.allows(ref[0]) and not grammar.allows(flag[0])  # the probe left the grammar as it was
    finally:
        grammar.close()


@pytest.mark.parametrize("answer, forced", [
    ('{"organ": "liver", "size": "12 cm",', ' "finding": "'),  # the answer's spacing: after "," and ":"
    ('{"organ":"liver","size":"12 cm",', '"finding":"'),  # compact: no space where the answer put none
    ('{"organ":', ''),  # the first ":" has no precedent: the space after it is left to the model
])
def test_forced_text_follows_the_answers_own_spacing(gemma, answer, forced):
    """Optional whitespace is the model's choice: ForcedText goes on through it the way the answer so
    far did (a space after the same punctuation, or none) and keeps a value's opening quote, which
    the model writes as a token of its own; without a precedent it stops."""
    from medgemma_edge.runtime import constrain

    props = {k: {"type": "string"} for k in ("organ", "size", "finding")}
    schema = {"type": "object", "properties": props, "required": list(props)}
    grammar = constrain.Constraint(gemma.vocab, constrain.schema_to_gbnf(schema))
    try:
        history = gemma.tokenize(answer, special=False)
        for tok in history:
            grammar.accept(tok)
        guess = drafters.ForcedText(grammar, gemma).draft(history, 8)
        text = b"".join(gemma.piece(t) for t in guess).decode()
        assert text == forced, f"after {answer!r} forced text guessed {text!r}, expected {forced!r}"
    finally:
        grammar.close()


class _Rows:
    """An engine stand-in that records its batches (every row's logits: zeros, so token 0 is picked)."""

    n_ctx, n_vocab = 1024, 8

    def __init__(self):
        self.n_past, self.batches = 0, []

    def eval_tokens(self, ids, rows=False):
        self.batches.append(list(ids))
        self.n_past += len(ids)

    def logits_rows(self):
        return np.zeros((len(self.batches[-1]), self.n_vocab), dtype=np.float32)

    def truncate(self, keep):
        self.n_past = keep


def test_a_sure_drafters_guesses_are_checked_whole():
    """A drafter whose guesses missed is asked for one guess more than it had confirmed; text a
    grammar forces (`sure`) is checked whole, up to SURE_DRAFT tokens, whatever the last batch kept."""

    class Guess:
        def __init__(self, sure):
            self.sure = sure

        def draft(self, history, k):
            return [5] * k

    for sure, want in ((False, [1, 5]), (True, [1] + [5] * spec.SURE_DRAFT)):
        engine = _Rows()
        look = spec.Lookahead(engine, drafters.Chain(Guess(sure)), k=4)
        look.advance(1, [1], room=100)  # first batch: k guesses, all refused (the model picks 0)
        look.advance(0, [1, 0], room=100)
        look.advance(1, [1, 0, 1], room=100)
        assert engine.batches[-1] == want, f"sure={sure}: batch {engine.batches[-1]}"


# -- sampling keeps the distribution ---------------------------------------------------------------

def _chi_square(counts: np.ndarray, p: np.ndarray) -> tuple[float, int, float]:
    """Pearson's statistic, its degrees of freedom and the 0.999 quantile of chi-square there
    (Wilson-Hilferty: a correct sampler fails about 1 run in 1000). Outcomes expected fewer than 5
    times are pooled into one, as the test asks."""
    n = counts.sum()
    assert counts[p == 0].sum() == 0, "a token of probability 0 was drawn"
    small = (n * p < 5) & (p > 0)
    obs = np.append(counts[(p > 0) & ~small], counts[small].sum())
    exp = np.append(n * p[(p > 0) & ~small], n * p[small].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    dof = len(obs) - 1
    bound = dof * (1 - 2 / (9 * dof) + 3.0902 * np.sqrt(2 / (9 * dof))) ** 3
    return float(((obs - exp) ** 2 / exp).sum()), dof, float(bound)


@pytest.mark.parametrize("guess", [0, 2, 4])
def test_accept_reject_draws_exactly_from_p(guess):
    p = np.array([0.05, 0.3, 0.15, 0.0, 0.4, 0.1])
    rng = np.random.default_rng(1234 + guess)
    counts = np.bincount([spec.sample_with_draft(p, guess, rng) for _ in range(20000)], minlength=len(p))
    chi2, dof, bound = _chi_square(counts, p)
    print(f"guess {guess}: chi-square {chi2:.2f} on {dof} degrees of freedom (bound {bound:.1f})")
    assert chi2 < bound


class MarkovEngine:
    """A 5-token "model" whose next-token logits depend on the last two tokens, with the engine
    interface speculative decoding uses (eval_tokens with rows, logits, truncate, n_past)."""

    n_vocab, n_ctx = 5, 64

    def __init__(self, seed: int = 0):
        self.table = np.random.default_rng(seed).normal(0, 1.2, size=(6, 6, 5)).astype(np.float32)
        self.cached: list = []

    def _logits_after(self, seq):
        a, b = ([5, 5] + [t for t in seq if isinstance(t, int)])[-2:]
        return self.table[a, b]

    @property
    def n_past(self):
        return len(self.cached)

    def eval_tokens(self, ids, *, rows=False):
        self._rows = [self._logits_after(self.cached + list(ids[:i + 1])) for i in range(len(ids))]
        self.cached.extend(ids)

    def logits(self):
        return self._logits_after(self.cached)

    def logits_rows(self):
        return np.stack(self._rows)

    def truncate(self, keep):
        del self.cached[keep:]
        return keep

    def is_end(self, tok):
        return False

    def piece(self, tok, special=False):
        return b"x"


def test_sampled_answers_keep_the_models_distribution():
    engine = MarkovEngine()
    s = gen.Sampling(max_new_tokens=3, temperature=1.0, repetition_guard=False)
    vocab = gen.Vocabulary(frozenset(), frozenset())

    class Always1:  # a drafter that always guesses token 1, right or wrong
        def draft(self, history, k):
            return [1] * k

    exact = np.zeros(125)
    for i in range(125):
        a, b, c = i // 25, i // 5 % 5, i % 5
        prob = 1.0
        for prev, tok in (([], a), ([a], b), ([a, b], c)):
            prob *= gen.probabilities(engine._logits_after([0] + prev), s)[tok]
        exact[i] = prob
    counts, accepted = np.zeros(125, dtype=int), 0
    for seed in range(12000):
        engine.cached = [0]  # the "prompt"
        look = spec.Lookahead(engine, Always1(), 3)
        s.seed = seed
        toks = [st.token for st in gen.decode(engine, s, vocab, None, look) if st.token is not None]
        counts[toks[0] * 25 + toks[1] * 5 + toks[2]] += 1
        accepted += look.stats.accepted
    chi2, dof, bound = _chi_square(counts, exact)
    print(f"three-token answers: chi-square {chi2:.1f} on {dof} degrees of freedom (bound {bound:.1f}), "
          f"{accepted} guesses accepted")
    assert accepted > 1000  # the guesses were used
    assert chi2 < bound


# -- choosing --------------------------------------------------------------------------------------

def test_speculative_modes_and_engines():
    assert spec_choice.wanted("on", None, "gguf") == {"text", "grammar"} and not spec_choice.wanted("off", None, "gguf")
    assert spec_choice.wanted("auto", "draft.gguf", "gguf")  # a named draft model asks for it
    assert not spec_choice.wanted("auto", None, "onnx")
    for mode, draft, backend, says in (("on", None, "onnx", "GGUF bundle"), ("fast", None, "gguf", "unknown"),
                                       ("off", "d.gguf", "gguf", "draft model")):
        with pytest.raises(InputError, match=says):
            spec_choice.wanted(mode, draft, backend)
    for kind, flags in {"vnni": {"avx2", "avx512f", "avx512_vnni"}, "avx2": {"avx2"}, "other": set()}.items():
        gains = spec_choice.MEASURED_GAIN.get(kind, {})
        for size in ("small", "large"):
            on = spec_choice.wanted("auto", None, "gguf", flags, size)
            assert ("text" in on) == ((gains.get(size) or 0) > 1), (kind, size)
            assert ("grammar" in on) == ((gains.get(f"{size}_json") or 0) > 1), (kind, size)


# -- a model loaded with speculative decoding, and text a grammar forces --------------------------

def _schemas():
    """20 small schemas: keys, enums, booleans, integers, bounded strings and arrays, a nested object."""
    kinds = [{"type": "string", "maxLength": 24}, {"enum": ["none", "mild", "moderate", "severe"]},
             {"type": "boolean"}, {"type": "integer"}, {"type": "array", "items": {"enum": ["left", "right"]},
                                                        "maxItems": 2},
             {"type": "object", "properties": {"value": {"type": "number"}, "unit": {"enum": ["mmol/L", "mg/dL"]}},
              "required": ["value", "unit"], "additionalProperties": False}]
    names = ["finding", "severity", "urgent", "count", "sides", "sodium", "organ", "follow_up", "impression",
             "laterality"]
    out = []
    for i in range(20):
        keys = [names[(i + j * 3) % len(names)] for j in range(2 + i % 3)]
        props = {k: kinds[(i + j) % len(kinds)] for j, k in enumerate(dict.fromkeys(keys))}
        out.append({"type": "object", "properties": props, "required": list(props), "additionalProperties": False})
    return out


@pytest.fixture(scope="module")
def demo_model():
    import medgemma_edge
    from medgemma_edge.demo import demo_bundle

    model = medgemma_edge.load(demo_bundle(progress=lambda *_: None), threads=2, context=1024, speculative="on")
    yield model
    model.close() if hasattr(model, "close") else None


def _tokens(model, messages, **kw):
    toks, last = [], None
    for r in model.stream(messages, **kw):
        last = r
        if r.token is not None:
            toks.append(r.token)
    return toks, last


def test_forced_text_gives_the_tokens_of_token_by_token_constrained_decoding(demo_model):
    kept = drafted = 0
    for i, schema in enumerate(_schemas()):
        messages = [{"role": "user", "content": f"Describe a chest X-ray finding as JSON with the keys "
                                                f"{', '.join(schema['properties'])}."}]
        kw = dict(max_new_tokens=24, json_schema=schema, temperature=1.0 if i % 2 else 0.0, seed=i)
        demo_model.speculation.on = ALL
        fast, last = _tokens(demo_model, messages, **kw)
        demo_model.speculation.on = frozenset()
        plain, _ = _tokens(demo_model, messages, **kw)
        demo_model.speculation.on = ALL
        first = next((j for j, (a, b) in enumerate(zip(plain, fast)) if a != b), None)
        assert fast == plain, f"schema {i} seed {i}: tokens differ from token {first} of {len(plain)}"
        kept, drafted = kept + last.stats.accepted_tokens, drafted + last.stats.drafted_tokens
    print(f"20 schemas: {kept} of {drafted} guessed tokens kept")
    assert kept > 20  # forced text and lookups were really tried and used


def test_cli_speculative_options(tmp_path):
    from click.testing import CliRunner

    from medgemma_edge.cli import main
    from medgemma_edge.demo import demo_bundle

    bundle = str(demo_bundle(progress=lambda *_: None))
    r = CliRunner().invoke(main, ["ask", "-m", bundle, "--speculative", "on", "--max-tokens", "8", "--stats",
                                  "Say hello."])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["ask", "-m", bundle, "--draft-model", str(tmp_path / "none.gguf"), "Hi"])
    assert r.exit_code == 2 and "none.gguf not found" in r.output, r.output


def test_auto_reads_the_gain_measured_per_kind_of_cpu():
    """spec_choice.MEASURED_GAIN is what each committed run's speculative.json measured on its own
    kind of CPU (benchmarks/results/ and a folder per other kind): no pasted figure."""
    import json
    from pathlib import Path

    root = Path(__file__).parents[1] / "benchmarks" / "results"
    measured = {}
    for path in [root / "speculative.json", *sorted(root.glob("*/speculative.json"))]:
        if path.exists():
            data = json.loads(path.read_text())
            measured[data["cpu_kind"]] = data["gain_by_kind"][data["cpu_kind"]]
    assert spec_choice.MEASURED_GAIN == measured, (f"MEASURED_GAIN is {spec_choice.MEASURED_GAIN}, the committed "
                                                   f"speculative.json files say {measured} — copy the measurement")
"""The repetition guard (runtime/repetition.py): a looping answer stops with finish_reason
"repetition" at the documented token; an answer that does not loop comes out token for token as
without the guard.

Three levels: the rule on token lists (against a stateless reading of the docstring's rule), the
shared decode loop over a scripted engine (plain, under a grammar, sampled), and the real Gemma 3
270M, which loops at greedy on most short prompts, through Model, the server and `ask`. Measured
(greedy, f32): "List the numbers." → "The number of the number of …" (a 3-token cycle, stopped after
33 tokens); with the card's system prompt (as the server and `ask` add it) "Count." echoes the
system prompt (an 8-token cycle, 32 tokens); without one, "Count." counts "(1)\n(2)\n(3)…", a list
that never stops; under the lab-report schema the answer ends by itself.
"""

import json

import httpx
import numpy as np
import openai
import pytest
from click.testing import CliRunner

from medgemma_edge.cli import main
from medgemma_edge.runtime import generate as gen
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.repetition import MAX_PERIOD, MIN_REPEATS, MIN_SPAN, Loop, first_loop
from medgemma_edge.server import ServerConfig, ServerThread, build_app
from medgemma_edge.server.errors import ApiError
from medgemma_edge.server.translate import chat_request


def _span(period: int) -> int:
    """The docstring's S: the repeating tokens that stop an answer looping with this period."""
    return max(MIN_SPAN, MIN_REPEATS * period)


def _loop_reference(tokens) -> tuple[int, Loop] | None:
    """The rule read straight from the docstring, nothing kept between tokens: after each token,
    for each period in order, are the last S tokens each equal to the token P before them?"""
    for n in range(1, len(tokens) + 1):
        for p in range(1, MAX_PERIOD + 1):
            s = _span(p)
            if n >= s and all(tokens[i] == tokens[i - p] for i in range(n - s + p, n)):
                return n, Loop(p, s)
    return None


def _words(text: str) -> list[int]:
    """Word-level token ids (whitespace and punctuation apart): stand-ins for a tokenizer's."""
    import re

    ids = {}
    return [ids.setdefault(w, len(ids)) for w in re.findall(r"\w+|[^\w ]| ", text)]


# -- the rule on token lists ------------------------------------------------------------------------

@pytest.mark.parametrize("period", [1, 2, 3, 4, 7, 8, 10, 11, 16, 21, 33, 64])
def test_a_cycle_stops_at_the_documented_token(period):
    prefix = [1000, 1001, 1002, 1003, 1004]  # the answer's start, before it loops
    tokens = prefix + list(range(period)) * (2 * _span(period) // period + 2)
    want = (len(prefix) + _span(period), Loop(period, _span(period)))
    got = first_loop(tokens)
    print(f"period {period}: stops after token {got and got[0]} (want {want[0]}), loop {got and got[1]}")
    assert got == want
    assert first_loop(tokens[:want[0] - 1]) is None  # one token earlier: not yet


def test_a_cycle_longer_than_the_longest_period_is_not_seen():
    tokens = list(range(MAX_PERIOD + 1)) * 6
    assert first_loop(tokens) is None, first_loop(tokens)


def test_text_that_repeats_its_structure_with_changing_values_never_stops():
    prose = ("The heart is normal in size. The lungs are clear without focal consolidation, effusion or "
             "pneumothorax. There is no acute osseous abnormality. The mediastinal contours are within normal "
             "limits, and the trachea is midline. Compared with the prior study of the same patient, the "
             "findings are unchanged; the small calcified granuloma in the right upper lobe is stable. ")
    numbered = "".join(f"{i}. {chr(97 + i % 26)}\n" for i in range(1, 80))  # 1. b 2. c 3. d …
    table = "| test | value | unit |\n|---|---|---|\n" + "".join(
        f"| T{i % 7} | {i * 1.5:.1f} | g/dL |\n" for i in range(60))
    entries = json.dumps({"tests": [{"name": f"Test {i}", "value": i * 3 % 17, "flag": "normal"} for i in range(40)]})
    for name, text in (("prose", prose), ("numbered list", numbered), ("table", table), ("json", entries)):
        tokens = _words(text)
        print(f"{name}: {len(tokens)} tokens, {first_loop(tokens)}")
        assert len(tokens) > 2 * MIN_SPAN and first_loop(tokens) is None, (name, first_loop(tokens))


def test_the_incremental_guard_agrees_with_the_rule_read_plainly():
    """Random answers from small alphabets (many chance repeats) with a cycle put in at random."""
    rng = np.random.default_rng(0)
    disagree, fired = [], 0
    for case in range(300):
        tokens = [int(t) for t in rng.integers(0, int(rng.choice([2, 3, 5, 40])), 160)]
        if case % 2:
            period, at = int(rng.integers(1, MAX_PERIOD + 1)), int(rng.integers(0, 100))
            cycle = [int(t) for t in rng.integers(0, 50, period)]
            tokens[at:] = (cycle * (400 // period + 1))[:400]
        got, want = first_loop(tokens), _loop_reference(tokens)
        fired += want is not None
        if got != want:
            disagree.append((case, got, want, tokens[:40]))
    print(f"300 answers, {fired} loop; first disagreements: {disagree[:3]}")
    assert not disagree and fired > 100


# -- the decode loop over a scripted engine --------------------------------------------------------

VOCAB, END = 256, 255


class ScriptedEngine:
    """The decode loop's view of an engine, answering `script` one token at a time (its logits put
    the next scripted token far first), then the end token."""
    n_ctx = 4096

    def __init__(self, script):
        self.script, self.n_past = list(script), 0

    def logits(self) -> np.ndarray:
        z = np.zeros(VOCAB, np.float32)
        z[self.script[self.n_past] if self.n_past < len(self.script) else END] = 50.0
        return z

    def is_end(self, tok: int) -> bool:
        return tok == END

    def piece(self, tok: int, special: bool = False) -> bytes:
        return f"w{tok} ".encode()

    def eval_tokens(self, tokens) -> None:
        self.n_past += len(tokens)


class AllowAll:
    """A grammar that allows every token and records what it was given (runtime/constrain.Constraint's face)."""

    def __init__(self):
        self.accepted = []

    def allows(self, tok: int) -> bool:
        return True

    def accept(self, tok: int) -> None:
        self.accepted.append(tok)

    def mask(self, logits):
        return logits


def _decode(script, constraint=None, **sampling):
    vocab = gen.Vocabulary(end_ids=frozenset({END}), shown_special_ids=frozenset())
    steps = list(gen.decode(ScriptedEngine(script), gen.Sampling(**sampling), vocab, constraint))
    tokens = [s.token for s in steps if s.token is not None]
    assert "".join(s.text for s in steps) == "".join(f"w{t} " for t in tokens)  # every token's text shown
    return tokens, steps[-1]


LOOPING = [10, 11, 12] + [20, 21, 22, 23] * 100  # stops after 3 + max(32, 3·4) = 35 tokens
NORMAL = [int(t) for t in np.random.default_rng(1).integers(0, 200, 150)] + [END]


def test_the_decode_loop_stops_a_loop_and_says_so():
    for label, constraint, sampling in (("greedy", None, {}), ("grammar", AllowAll(), {}),
                                        ("sampled", None, {"temperature": 0.7, "seed": 3})):
        on, last = _decode(LOOPING, constraint, max_new_tokens=200, **sampling)
        off, last_off = _decode(LOOPING, constraint, max_new_tokens=200, repetition_guard=False, **sampling)
        print(f"{label}: guard on {len(on)} tokens {last.finish_reason} {last.loop}; off {len(off)} "
              f"{last_off.finish_reason}; on {on[-8:]}")
        assert (len(on), last.finish_reason, last.loop) == (35, "repetition", Loop(4, 32))
        assert on == LOOPING[:35] and (off, last_off.finish_reason, last_off.loop) == (LOOPING[:200], "length", None)
        if constraint is not None:
            assert constraint.accepted == LOOPING[:35] + LOOPING[:200]  # the grammar saw each answer's tokens


def test_the_decode_loop_leaves_an_answer_without_a_loop_as_it_was():
    assert first_loop(NORMAL) is None
    on, last = _decode(NORMAL, max_new_tokens=400)
    off, last_off = _decode(NORMAL, max_new_tokens=400, repetition_guard=False)
    first = next((i for i, (a, b) in enumerate(zip(on, off)) if a != b), None)
    print(f"{len(on)} / {len(off)} tokens, first difference at {first}")
    assert on == off == NORMAL[:-1] and last.finish_reason == last_off.finish_reason == "stop"
    assert last.loop is None


def test_the_option_is_checked():
    with pytest.raises(InputError, match="repetition_guard"):
        gen.Sampling(repetition_guard=1).check()
    with pytest.raises(InputError, match="repetition_guard"):
        ServerConfig(repetition_guard="off").check()
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    opts = lambda b, **kw: chat_request(b, {}, max_images=1, max_tokens=8, **kw).options["repetition_guard"]
    assert opts(body) is True and opts(body, repetition_guard=False) is False
    asked = {**body, "medgemma_edge": {"repetition_guard": False}}
    assert opts(asked) is False and opts({**body, "medgemma_edge": {"repetition_guard": True}},
                                         repetition_guard=False) is True
    with pytest.raises(ApiError, match="repetition_guard"):
        chat_request({**body, "medgemma_edge": {"repetition_guard": "no"}}, {}, max_images=1, max_tokens=8)


# -- the real Gemma 3 270M -------------------------------------------------------------------------

LOOP_CHAT = [{"role": "user", "content": "List the numbers."}]
LOOP_TOKENS = 48  # the loops (module docstring) are seen after 33 and 32 tokens
COUNT = "Count."
LAB = ("LAB REPORT\nHemoglobin 10.2 g/dL (ref 12.0-16.0) LOW\nGlucose 95 mg/dL (ref 70-99)\n"
       "Extract every test result of this lab report.")


@pytest.fixture(scope="module")
def model(gemma270m_bundle_f32):
    import medgemma_edge

    return medgemma_edge.load(gemma270m_bundle_f32, threads=2, context=1024)


def _tokens(model, messages, **options):
    *steps, last = model.stream(messages, **options)
    return [r.token for r in steps if r.token is not None], last


def _text(model, tokens) -> str:
    return b"".join(model.engine.piece(t) for t in tokens).decode("utf-8", "replace")


def test_270m_loop_is_stopped_where_the_rule_says(model):
    off, last_off = _tokens(model, LOOP_CHAT, max_new_tokens=LOOP_TOKENS, repetition_guard=False)
    on, last = _tokens(model, LOOP_CHAT, max_new_tokens=LOOP_TOKENS)
    print(f"off: {len(off)} tokens {last_off.finish_reason} {_text(model, off)!r}\n"
          f"on: {len(on)} tokens {last.finish_reason} {_text(model, on)!r}\n"
          f"stats {last.stats.repetition_period} {last.stats.repetition_tokens}; the rule on off's tokens: "
          f"{first_loop(off)}")
    assert last_off.finish_reason == "length" and len(off) == LOOP_TOKENS  # it loops to the limit
    assert last.finish_reason == "repetition" and len(on) < LOOP_TOKENS and on == off[:len(on)]
    assert first_loop(off) == (len(on), Loop(last.stats.repetition_period, last.stats.repetition_tokens))
    assert last.completion_tokens == len(on) and last_off.stats.repetition_period is None


def test_270m_answers_without_a_loop_are_the_same_with_and_without_the_guard(model):
    """A counted list, and a JSON answer under the lab-report schema (the grammar path) that ends by itself."""
    from medgemma_edge.structured import resolve_options

    chosen = resolve_options("lab-report", max_new_tokens=200)
    json_chat = [{"role": "system", "content": chosen.system}, {"role": "user", "content": LAB}]
    for chat, options, reason in (([{"role": "user", "content": COUNT}], dict(max_new_tokens=LOOP_TOKENS), "length"),
                                  (json_chat, dict(max_new_tokens=200, json_schema=chosen.json_schema), "stop")):
        on, last = _tokens(model, chat, **options)
        off, last_off = _tokens(model, chat, **options, repetition_guard=False)
        first = next((i for i, (a, b) in enumerate(zip(on, off)) if a != b), None)
        print(f"on {len(on)} tokens {last.finish_reason}, off {len(off)} {last_off.finish_reason}, first difference "
              f"at {first}: {_text(model, on)!r}")
        assert on == off and last.finish_reason == last_off.finish_reason == reason
    json.loads(_text(model, on))


def test_270m_tokens_of_normal_text_never_stop(model):
    """Real token ids (the 270M's tokenizer, Gemma 3's) of text whose structure repeats."""
    report = ("FINDINGS: The heart is normal in size. The lungs are clear without focal consolidation, pleural "
              "effusion or pneumothorax. No acute osseous abnormality. IMPRESSION: No acute cardiopulmonary "
              "process. Compared with the prior radiograph, the findings are unchanged.")
    numbered = "".join(f"{i}. Finding {i}: no abnormality\n" for i in range(1, 41))
    table = "| Test | Value | Unit | Flag |\n|---|---|---|---|\n" + "".join(
        f"| Test {i} | {i * 1.7:.1f} | mg/dL | normal |\n" for i in range(30))
    for name, text in (("report", report), ("numbered", numbered), ("table", table)):
        tokens = model.engine.tokenize(text)
        print(f"{name}: {len(tokens)} tokens, {first_loop(tokens)}")
        assert len(tokens) > MIN_SPAN and first_loop(tokens) is None, (name, first_loop(tokens))
    looping = model.engine.tokenize("The number of the number" + " of the number" * 20)
    assert first_loop(looping) is not None and first_loop(looping)[1].period == 3, first_loop(looping)


def test_270m_server_says_length_and_repetition(model):
    from medgemma_edge.server.backend import LocalBackend

    backend = LocalBackend(model)
    loop = dict(model="any", messages=[{"role": "user", "content": COUNT}], max_tokens=LOOP_TOKENS)
    with ServerThread(build_app(backend, ServerConfig(metrics=True))) as on, \
            ServerThread(build_app(backend, ServerConfig(repetition_guard=False))) as off:
        client = lambda s: openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=120)
        plain = client(on).chat.completions.create(**loop)
        chunks = list(client(on).chat.completions.create(**loop, stream=True))
        asked_off = client(on).chat.completions.create(**loop, extra_body={"medgemma_edge": {"repetition_guard": False}})
        served_off = client(off).chat.completions.create(**loop)  # (a request's true over it: translate's test)
        metrics = httpx.get(on.url + "/metrics").text
    extra = lambda r: r.model_extra["medgemma_edge"]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    print(f"plain {plain.choices[0].finish_reason} {extra(plain).get('finish_reason')} "
          f"{plain.usage.completion_tokens} tokens: {plain.choices[0].message.content!r}")
    assert (plain.choices[0].finish_reason, extra(plain)["finish_reason"]) == ("length", "repetition")
    assert plain.usage.completion_tokens < LOOP_TOKENS and extra(plain)["stats"]["repetition_period"] is not None
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert extra(finals[0])["finish_reason"] == "repetition"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    for r in (asked_off, served_off):
        assert r.choices[0].finish_reason == "length" and "finish_reason" not in extra(r)
        assert r.usage.completion_tokens == LOOP_TOKENS and extra(r)["stats"]["repetition_period"] is None
    counted = [ln for ln in metrics.splitlines() if ln.startswith("medgemma_edge_repetition_stops_total")]
    assert counted == ["medgemma_edge_repetition_stops_total 2.0"], counted  # plain and streamed


def test_270m_ask_and_serve_take_the_flag(gemma270m_bundle_f32, monkeypatch):
    from medgemma_edge.server import runner

    args = ["ask", "-m", str(gemma270m_bundle_f32), "--threads", "2", "--max-tokens", str(LOOP_TOKENS), "--stats",
            COUNT]
    stats = lambda out: json.loads(next(ln for ln in out.stderr.splitlines() if ln.startswith("stats "))[6:])
    on, off = CliRunner().invoke(main, args), CliRunner().invoke(main, [*args, "--no-repetition-guard"])
    print(on.output, off.output, sep="\n")
    assert on.exit_code == off.exit_code == 0, (on.output, off.output)
    assert stats(on)["finish_reason"] == "repetition" and stats(on)["completion_tokens"] < LOOP_TOKENS
    assert "--no-repetition-guard lets it run on" in on.stderr
    assert (stats(off)["finish_reason"], stats(off)["completion_tokens"]) == ("length", LOOP_TOKENS)
    seen = []
    monkeypatch.setattr(runner, "serve", lambda backend, config, node=None: seen.append(config))
    for flag in ([], ["--no-repetition-guard"]):
        with pytest.raises(SystemExit):
            main.main(["serve", "-m", str(gemma270m_bundle_f32), *flag], prog_name="medgemma-edge")
    assert [c.repetition_guard for c in seen] == [True, False]

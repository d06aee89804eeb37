"""A JSON schema on an ONNX bundle: the same llama.cpp grammar (runtime/constrain.py) over the ONNX
decoder, its vocabulary read from the bundle's vocab-only tokenizer.gguf.

tiny's random weights give noise without the grammar, so with it every sampled answer must parse
and validate (jsonschema); without it the same calls are counted, and must not all be that JSON.
The bundle is the session's fp32 export (tests/conftest.py `onnx_bundles`), shared with
tests/test_onnx_bundle.py.
"""

import json

import jsonschema
import pytest

SEEDS = range(5)
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "grade": {"enum": ["a", "b", "c"]}},
          "required": ["ok", "grade"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Is the report complete? Answer as JSON with ok and grade."}]


@pytest.fixture(scope="module")
def model(onnx_bundles):
    import medgemma_edge

    return medgemma_edge.load(onnx_bundles("fp32").bundle, device="cpu", threads=2, context=1024)


def _valid(text: str) -> str | None:
    """None when `text` is JSON valid for SCHEMA, else why not (one line)."""
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except ValueError as err:
        return f"not JSON: {err}"
    except jsonschema.ValidationError as err:
        return f"invalid: {err.message}"
    return None


def test_sampled_answers_of_an_onnx_bundle_validate_with_the_schema(model):
    assert model.manifest["backend"] == "onnx"
    answers, bad = [], []
    for seed in SEEDS:
        r = model.chat(MESSAGES, json_schema=SCHEMA, max_new_tokens=64, temperature=1.0, seed=seed)
        answers.append(r.text)
        why = _valid(r.text) if r.finish_reason == "stop" else f"cut at {r.completion_tokens} tokens"
        if why is not None:
            bad.append((seed, r.finish_reason, why, r.text[:200]))
    print(f"with schema: {len(SEEDS) - len(bad)}/{len(SEEDS)} valid, {len(set(answers))} distinct")
    for a in answers:
        print("  ", repr(a))
    assert not bad, f"{len(bad)} of {len(SEEDS)} answers fail the schema: {bad}"


def test_without_the_schema_the_same_calls_are_not_all_that_json(model):
    answers = [model.chat(MESSAGES, max_new_tokens=64, temperature=1.0, seed=seed).text for seed in SEEDS]
    valid = sum(_valid(a.strip()) is None for a in answers)
    print(f"without schema: {valid}/{len(SEEDS)} valid for the schema; first: {answers[0][:80]!r}")
    assert valid < len(SEEDS), "unconstrained random weights gave schema-valid JSON every time: the grammar " \
                               "test above proves nothing"

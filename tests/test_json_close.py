"""runtime/json_close.py: a JSON answer cut by the token limit, closed at its last complete entry.

Reference: jsonschema validates every closed answer; every cut of a real document is tried."""

from __future__ import annotations

import json

import jsonschema
import pytest

from medgemma_edge.runtime.json_close import close_at_limit, close_cut_answer
from medgemma_edge.runtime.reply import Stats
from medgemma_edge.structured import load_schema

LAB = load_schema("lab_report")
TESTS = [{"name": "Hemoglobin", "value": "10.1", "unit": "g/dL", "reference_range": "12.0-16.0", "flag": "low"},
         {"name": "Na, \"serum\" [x]{y}", "value": "139", "unit": "mmol/L", "reference_range": "135-145",
          "flag": "normal"},
         {"name": "K", "value": "5.9", "unit": "mmol/L", "reference_range": "3.5-5.1", "flag": "high"}]
DOC = json.dumps({"tests": TESTS, "summary": "Low hemoglobin, high potassium, {not a bracket], \\ done."})


def test_every_cut_of_a_lab_report_closes_valid_and_keeps_only_whole_entries():
    """Each prefix of a real answer: the closed document validates against the schema (jsonschema),
    holds a prefix of the tests, each of them whole and equal to the original's, and nothing else."""
    closed_count = 0
    for cut in range(1, len(DOC)):
        closed = close_at_limit(DOC[:cut], LAB)
        if closed is None:  # only before the tests array has begun
            assert cut <= DOC.index("["), (cut, DOC[:cut])
            continue
        closed_count += 1
        doc = json.loads(closed)
        jsonschema.validate(doc, LAB)
        assert doc["tests"] == TESTS[:len(doc["tests"])], (cut, closed)
        assert doc.get("summary") in (None, json.loads(DOC)["summary"]), (cut, closed)
    assert closed_count > len(DOC) - 20
    assert close_at_limit(DOC, LAB) == DOC  # a whole document stays as it is


def test_the_latest_whole_entry_wins_and_the_stats_say_what_was_dropped():
    cut = DOC[:DOC.index('"K"') + 5]  # inside the third test
    stats = Stats()
    closed = close_cut_answer(cut, LAB, stats)
    assert json.loads(closed)["tests"] == TESTS[:2]
    assert stats.json_closed == len(cut) - (len(closed) - 2), (stats.json_closed, closed[-20:])  # "]}" added


@pytest.mark.parametrize("schema, text", [
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a", "b"]},
     '{"a": "x", "b": "y'),  # a required member would be missing
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 2, "items": {"type": "integer"}}}, "required": ["a"]},
     '{"a": [1, 2'),  # minItems would not be met (the 2 may go on: 25)
    ({"anyOf": [{"type": "object"}]}, '{"a": [1, 2'),  # a schema this check does not follow
])
def test_what_cannot_be_closed_without_inventing_stays_as_cut(schema, text):
    assert close_at_limit(text, schema) is None
    stats = Stats()
    assert close_cut_answer(text, schema, stats) == text and stats.json_closed is None


def test_nested_arrays_and_a_number_cut_short():
    schema = {"type": "object", "properties": {"rows": {"type": "array", "items": {
        "type": "array", "items": {"type": "number"}}}}, "required": ["rows"]}
    closed = close_at_limit('{"rows": [[1, 2], [3.5, 4', schema)
    jsonschema.validate(json.loads(closed), schema)
    assert json.loads(closed) == {"rows": [[1, 2], [3.5]]}  # the 4 may have gone on: dropped

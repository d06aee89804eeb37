"""A JSON answer cut by the token limit, closed at its last complete entry (nothing invented).

A schema-constrained answer (runtime/constrain.py) is valid JSON when it ends by itself. When the
token limit cuts it (finish_reason "length") or the repetition guard stops it in a loop
("repetition", runtime/repetition.py), what came out is a prefix of a valid document. An
app that reads the answer needs a document, so the whole answer (`Model.chat`, `ask` with a
schema, the server's non-streamed reply) is closed here:

- the cut is moved back to the last comma between complete entries of an array or complete
  members of an object (or to just after an opening bracket), so a half-written entry or member
  is dropped whole, never finished with made-up values;
- the open brackets are closed;
- the result must parse and meet the schema's `required` members and `minItems` at every level
  it reaches; the latest cut that does wins. A schema using what this check does not follow
  ($ref, anyOf, oneOf, allOf, not, if) is not closed: the answer stays as cut.

The answer keeps its finish_reason ("length" or "repetition"), and the stats say `json_closed` (how many characters
were dropped), so a reader knows entries may be missing. A streamed answer is not closed: its
pieces were already sent.
"""

from __future__ import annotations

import json

_UNFOLLOWED = ("$ref", "anyOf", "oneOf", "allOf", "not", "if")


def close_cut_answer(text: str, json_schema, stats=None) -> str:
    """`text` closed (close_at_limit) or as it was; the characters dropped go to stats.json_closed."""
    from medgemma_edge.runtime.constrain import parse_schema

    found = _closing(text, parse_schema(json_schema))
    if found is None:
        return text
    closed, kept = found
    if stats is not None:  # what was cut off the answer (the closing brackets added are not counted)
        stats.json_closed = len(text) - kept
    return closed


def close_at_limit(text: str, schema) -> str | None:
    """The longest closing of `text` (a cut JSON answer) that parses and meets `schema`; None if none."""
    found = _closing(text, schema)
    return None if found is None else found[0]


def _closing(text: str, schema) -> tuple[str, int] | None:
    """(the closed text, how many characters of `text` it keeps)."""
    if not isinstance(schema, dict) or _uses_unfollowed(schema):
        return None
    for cut, closers in reversed(_cut_points(text)):
        kept = text[:cut].rstrip()
        try:
            doc = json.loads(kept + closers)
        except ValueError:
            continue
        if _complete(doc, schema):
            return kept + closers, len(kept)
    return None


def _cut_points(text: str) -> list[tuple[int, str]]:
    """(index, closing brackets) where the text may be cut: before a comma at container level, or
    just after an opening bracket; the brackets then open, innermost last in the string reversed."""
    points: list[tuple[int, str]] = []
    stack: list[str] = []
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
            points.append((i + 1, "".join(reversed(stack))))
        elif ch in "]}":
            if not stack:
                return points
            stack.pop()
            if not stack:
                return points + [(i + 1, "")]  # the document ended: nothing to close
        elif ch == "," and stack:
            points.append((i, "".join(reversed(stack))))
    return points


def _complete(doc, schema: dict) -> bool:
    """`doc` has every required member and at least minItems entries, wherever the schema says."""
    if isinstance(doc, dict):
        if any(key not in doc for key in schema.get("required", ())):
            return False
        props = schema.get("properties", {})
        return all(_complete(value, props[key]) for key, value in doc.items() if isinstance(props.get(key), dict))
    if isinstance(doc, list):
        if len(doc) < schema.get("minItems", 0):
            return False
        items = schema.get("items")
        return not isinstance(items, dict) or all(_complete(value, items) for value in doc)
    return True


def _uses_unfollowed(schema) -> bool:
    if isinstance(schema, dict):
        return any(k in schema for k in _UNFOLLOWED) or any(_uses_unfollowed(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_uses_unfollowed(v) for v in schema)
    return False

"""OpenAI tool calling and structured answers for a model without tool tokens (Gemma 3 / MedGemma).

Gemma 3 has no native tool-call format, so the server writes one into the prompt and holds the
answer to it with a grammar (runtime/constrain.py):

- **Tool list** — appended to the system turn (which runtime/chat.py folds into the first user
  turn):

      You can call tools. Each tool is one JSON line: its name, what it does, and its parameters as
      a JSON schema.
      {"name": "lookup_lab", "description": "...", "parameters": {...}}
      To call a tool, answer with only one JSON object: {"name": "<tool name>", "arguments": {...}}.
      Otherwise answer in plain text.

  tool_choice "required" says "You must call one of these tools …", a named function "You must
  call the tool lookup_lab …"; "none" leaves the tools out of the prompt and the answer free.
- **The call** — the answer is `{"name": ..., "arguments": {...}}`, constrained to the JSON schema
  anyOf over `{"name": {"const": tool}, "arguments": tool's parameters}` ("required"; one tool when
  named). Under "auto" the grammar lets the first character choose: `{` starts a call (held to that
  schema), anything else is a plain answer (so a plain answer cannot begin with `{`).
  One call per answer (parallel_tool_calls is not offered); it comes back as `tool_calls` with
  finish_reason "tool_calls".
- **History** — an assistant message's `tool_calls` are rendered as the JSON it would have
  answered; each `role: "tool"` message becomes a user turn
  `Tool result of lookup_lab (call_…):\n<content>` (consecutive results in one turn).

`response_format` {"type": "json_schema", "json_schema": {"name", "schema"}} or {"type":
"json_object"} constrains a plain answer the same way; the answer's text is the JSON.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from medgemma_edge.runtime.constrain import rename_root, schema_to_gbnf
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.server.errors import ApiError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
PLAIN_TEXT = '\nroot ::= tool-call | plain-text\nplain-text ::= [^{ \\t\\n] [^\\x00]*'
INTRO = ("You can call tools. Each tool is one JSON line: its name, what it does, and its parameters as a "
         "JSON schema.")
HOW = 'answer with only one JSON object: {"name": "<tool name>", "arguments": {...}}.'


@dataclass
class Tools:
    tools: list[dict]  # {"name", "description", "parameters"}
    choice: str  # "auto", "required" or a tool's name ("none" never builds a Tools)

    @property
    def names(self) -> list[str]:
        return [t["name"] for t in self.tools]

    def offered(self) -> list[dict]:
        return self.tools if self.choice in ("auto", "required") else [t for t in self.tools if t["name"] == self.choice]

    def prompt(self) -> str:
        lines = [INTRO] + [json.dumps(t, ensure_ascii=False) for t in self.offered()]
        if self.choice == "auto":
            lines.append(f"To call a tool, {HOW} Otherwise answer in plain text.")
        elif self.choice == "required":
            lines.append(f"You must call one of these tools: {HOW}")
        else:
            lines.append(f"You must call the tool {self.choice}: {HOW}")
        return "\n".join(lines)

    def call_schema(self) -> dict:
        calls = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in self.offered()]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def constraint(self) -> dict:
        """The Backend.chat option holding the answer to a call: json_schema, or (auto) a grammar."""
        if self.choice != "auto":
            return {"json_schema": self.call_schema()}
        try:
            gbnf = schema_to_gbnf(self.call_schema())
        except InputError as err:
            raise ApiError(400, f"a tool's parameters: {err}", "tools") from None
        return {"grammar": rename_root(gbnf, "tool-call") + PLAIN_TEXT}

    def read_call(self, text: str) -> dict | None:
        """The OpenAI tool_calls entry in an answer, or None when the answer is not a call."""
        try:
            call = json.loads(text)
        except ValueError:
            return None
        if not (isinstance(call, dict) and call.get("name") in self.names and isinstance(call.get("arguments"), dict)):
            return None
        return {"id": "call_" + secrets.token_hex(12), "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def parse_tools(body: dict) -> Tools | None:
    """`tools` and `tool_choice` checked (400 naming the field); None when no tool may be called."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice names a tool but no tools were given", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > 64:
        raise ApiError(400, "tools must be a list of up to 64 {type: function, function: {...}}", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise ApiError(400, f"tools[{i}] must be {{type: function, function: {{name: a-z, 0-9, _ or -, "
                                "description, parameters}}}", f"tools[{i}]")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters")
        entry = {"name": fn["name"], "description": str(fn.get("description", ""))[:2000], "parameters": params}
        out.append(entry)
    names = [t["name"] for t in out]
    if len(set(names)) != len(names):
        raise ApiError(400, "two tools have the same name", "tools")
    choice = "auto" if choice is None else choice
    if isinstance(choice, dict):
        named = choice.get("function", {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(named, str) or named not in names:
            raise ApiError(400, f"tool_choice names no given tool — use one of {', '.join(names)[:200]}",
                           "tool_choice")
        choice = named
    elif choice not in ("auto", "none", "required"):
        raise ApiError(400, 'tool_choice must be "auto", "none", "required" or {type: function, function: {name}}',
                       "tool_choice")
    if choice == "none":
        return None
    spec = Tools(out, choice)
    try:
        spec.constraint() if choice == "auto" else schema_to_gbnf(spec.call_schema())
    except InputError as err:
        raise ApiError(400, f"a tool's parameters: {err}", "tools") from None
    return spec


def response_schema(body: dict) -> dict | None:
    """The JSON schema `response_format` asks for; None for text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ApiError(400, 'response_format must be {"type": "text"}, {"type": "json_object"} or '
                            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}', "response_format")
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                       "response_format.json_schema.schema")
    try:
        schema_to_gbnf(schema)
    except InputError as err:
        raise ApiError(400, str(err), "response_format.json_schema.schema") from None
    return schema


def call_text(tool_calls, where: str) -> str:
    """An assistant message's tool_calls as the answer the model gives for them (one JSON per line)."""
    if not isinstance(tool_calls, list):
        raise ApiError(400, f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    lines = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where}.tool_calls[{j}] must be {{id, type, function: {{name, arguments}}}}",
                           f"{where}.tool_calls[{j}]")
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise ApiError(400, f"{where}.tool_calls[{j}].function.arguments is not JSON",
                           f"{where}.tool_calls[{j}].function.arguments") from None
        lines.append(json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False))
    return "\n".join(lines)


def result_text(message: dict, names: dict, where: str) -> str:
    """A role "tool" message as the text of a user turn."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be the tool's result as text", f"{where}.content")
    call_id = message.get("tool_call_id")
    name = names.get(call_id) or message.get("name") or "a tool"
    return f"Tool result of {name}" + (f" ({call_id})" if isinstance(call_id, str) else "") + f":\n{content}"

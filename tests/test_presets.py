"""Task presets: the table, `medgemma-edge presets`, `ask --preset` (explicit options win) and the
server's `preset` field (tests/test_tools.py runs it through the server with the real model)."""

import json
import sys

import pytest
from click.testing import CliRunner

from medgemma_edge.cli import main
from medgemma_edge.runtime.chat_template import ChatTemplate
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.presets import PRESETS, apply, card_system, get_preset
from medgemma_edge.structured import schema_names

CARD_TASKS = {"cxr-report", "ct-series", "dermatology", "pathology", "text-qa"}


def test_the_table_covers_the_card_tasks_and_names_shipped_schemas():
    print({p.name: (p.max_new_tokens, p.think, p.json_schema) for p in PRESETS.values()})
    assert CARD_TASKS <= set(PRESETS)
    assert all(p.json_schema in (None, *schema_names()) for p in PRESETS.values())
    # longitudinal-cxr and pathology-slide have none: Google's notebooks send no system prompt
    assert all((p.system or p.name in ("longitudinal-cxr", "pathology-slide")) and p.max_new_tokens > 0
               for p in PRESETS.values())


def test_explicit_options_override_the_preset():
    qa = get_preset("text-qa")
    assert apply(qa, {}) == {"system": qa.system, "max_new_tokens": 1024, "think": True, "json_schema": None}
    assert apply(qa, {"think": False, "max_new_tokens": 8, "system": "Be terse."}) == {
        "system": "Be terse.", "max_new_tokens": 8, "think": False, "json_schema": None}
    assert apply(None, {"max_new_tokens": 5}) == {"system": None, "max_new_tokens": 5, "think": None,
                                                  "json_schema": None}


def test_an_unknown_preset_lists_the_names():
    with pytest.raises(InputError) as err:
        get_preset("xray")
    print(err.value)
    assert all(name in str(err.value) for name in PRESETS)


def test_presets_command_lists_every_preset():
    out = CliRunner().invoke(main, ["presets"])
    print(out.output)
    assert out.exit_code == 0 and all(name in out.output for name in PRESETS)
    listed = json.loads(CliRunner().invoke(main, ["presets", "--json"]).output)
    assert [p["name"] for p in listed] == list(PRESETS) and listed[0]["system"] == PRESETS["cxr-report"].system


def test_ask_with_an_unknown_preset_is_one_line_exit_2():
    out = CliRunner().invoke(main, ["ask", "--preset", "xray", "hi"])
    print(out.output)
    assert out.exit_code == 2 and out.output.count("\n") == 1 and "text-qa" in out.output


@pytest.mark.parametrize("args,want", [
    (["--preset", "text-qa"], dict(system=PRESETS["text-qa"].system, think=True, max_tokens=1024, json_schema=None)),
    (["--preset", "text-qa", "--no-think", "--max-tokens", "7", "--system", "S"],
     dict(system="S", think=False, max_tokens=7, json_schema=None)),
    (["--preset", "localize"], dict(system=PRESETS["localize"].system, think=False, max_tokens=256)),
    ([], dict(system=None, think=False, max_tokens=256, json_schema=None)),
])
def test_ask_passes_the_preset_and_the_overrides(monkeypatch, tmp_path, args, want):
    seen = {}
    module = sys.modules["medgemma_edge.cli.ask"]  # the package's `ask` attribute is the command
    monkeypatch.setattr(module, "answer", lambda bundle, prompt, images, **kw: seen.update(kw))
    out = CliRunner().invoke(main, ["ask", "-m", str(tmp_path), *args, "hi"])
    assert out.exit_code == 0, out.output
    got = {k: seen[k] for k in want}
    print(args, got, "schema" if seen["json_schema"] else "")
    assert got == want
    if "localize" in args:
        assert seen["json_schema"]["title"] == "box_2d"


def test_ask_with_a_preset_puts_its_system_prompt_in_the_prompt(monkeypatch):
    from medgemma_edge.demo import demo_bundle

    prompts = []
    render = ChatTemplate.parts  # every prompt is rendered by the bundle's template (runtime/chat_template.py)
    monkeypatch.setattr(ChatTemplate, "parts", lambda *a, **k: prompts.append(render(*a, **k)) or prompts[-1])
    out = CliRunner().invoke(main, ["ask", "-m", str(demo_bundle(progress=lambda *_: None)), "--threads", "2",
                                    "--preset", "dermatology", "--max-tokens", "2", "Is this mole worrying?"])
    prompt = "".join(prompts[-1])
    print(prompt)
    assert out.exit_code == 0, out.output
    assert prompt.startswith("<bos><start_of_turn>user\nYou are an expert dermatologist.\n\nIs this mole")


def test_resolve_options_order_and_schema():
    """Explicit beats the preset, the preset beats the default; schemas load by name, dicts pass."""
    from medgemma_edge.runtime.generate import DEFAULT_MAX_NEW_TOKENS
    from medgemma_edge.structured import resolve_options

    loc = resolve_options("localize")
    print(loc)
    assert (loc.system, loc.max_new_tokens, loc.think) == (PRESETS["localize"].system, 256, False)
    assert loc.json_schema["title"] == "box_2d"
    assert resolve_options(None).max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert resolve_options(None, default_max_new_tokens=9).max_new_tokens == 9
    own = {"type": "object"}
    assert resolve_options("localize", json_schema=own).json_schema is own
    assert resolve_options("localize", preset_schema=False).json_schema is None
    assert resolve_options("text-qa", think=False, max_new_tokens=3).think is False
    with pytest.raises(InputError, match="text-qa"):
        resolve_options("xray")


@pytest.mark.parametrize("name", list(PRESETS))
def test_ask_and_the_server_resolve_a_preset_alike(monkeypatch, tmp_path, name):
    """The same preset gives `ask` and a chat request the same system prompt, length, thinking and
    schema (one resolution, medgemma_edge.structured.resolve_options)."""
    from medgemma_edge.server.config import MAX_TOKENS
    from medgemma_edge.server.translate import chat_request

    seen = {}
    module = sys.modules["medgemma_edge.cli.ask"]
    monkeypatch.setattr(module, "answer", lambda bundle, prompt, images, **kw: seen.update(kw))
    out = CliRunner().invoke(main, ["ask", "-m", str(tmp_path), "--preset", name, "hi"])
    assert out.exit_code == 0, out.output
    system = seen["system"] or card_system(False)  # what `answer` sends for a preset with none of its own
    cli = (system, seen["max_tokens"], seen["think"], seen["json_schema"])
    request = chat_request({"messages": [{"role": "user", "content": "hi"}], "preset": name}, {},
                           max_images=1, max_tokens=MAX_TOKENS)
    server = (request.messages[0]["content"] if request.messages[0]["role"] == "system" else None,
              request.options["max_tokens"], request.options.get("think", False), request.options.get("json_schema"))
    print(name, cli[:3], server[:3])
    assert cli == server

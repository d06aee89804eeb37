"""`medgemma-edge presets`: the named task presets `ask --preset` and the server's `preset` take."""

from __future__ import annotations

import json

import click


@click.command("presets")
@click.option("--json", "as_json", is_flag=True, help="print them as JSON")
def presets_cmd(as_json):
    """List the task presets: system prompt, answer length, thinking, JSON schema."""
    from medgemma_edge.runtime.presets import PRESETS

    if as_json:
        click.echo(json.dumps([p.as_dict() for p in PRESETS.values()], indent=2))
        return
    for p in PRESETS.values():
        extras = [f"max {p.max_new_tokens} tokens"] + (["thinks"] if p.think else []) + (
            [f"schema {p.json_schema}"] if p.json_schema else [])
        click.echo(f"{p.name:<13} {p.task}")
        system = repr(p.system) if p.system is not None else "none of its own"
        click.echo(f"{'':<13} system: {system}; {', '.join(extras)}")
        if p.question:
            click.echo(f"{'':<13} question (when no PROMPT is given): {p.question!r}")

"""The JSON schemas shipped with the package (medgemma_edge/schemas/*.json) and `--json-schema`'s
lookup: a shipped schema's name, or a file of the user's.

Shipped, for the MedGemma 1.5 uses that want machine-readable answers: `lab_report` (a lab report
to a list of results), `cxr_findings` (chest X-ray findings over the CheXpert labels) and `box_2d`
(localization boxes; map them to the picture with medgemma_edge.runtime.boxes).

`resolve_options` turns a preset name and a caller's explicit options into what one question runs
with; `ask` and the server both call it, so a preset means the same on either face.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from medgemma_edge.runtime.constrain import parse_schema
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.generate import DEFAULT_MAX_NEW_TOKENS
from medgemma_edge.runtime.presets import apply, get_preset


def _folder():
    return resources.files("medgemma_edge").joinpath("schemas")


def schema_names() -> list[str]:
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".json"))


def load_schema(name_or_path) -> dict:
    """A shipped schema by name (`box_2d`), or a JSON schema file; InputError in one line otherwise."""
    text = None
    if isinstance(name_or_path, str) and name_or_path in schema_names():
        text = _folder().joinpath(name_or_path + ".json").read_text()
    else:
        path = Path(name_or_path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read the JSON schema {path.name} ({type(err).__name__}) — give a file or "
                             f"one of the shipped schemas: {', '.join(schema_names())}") from None
    return parse_schema(text, f"the JSON schema {Path(str(name_or_path)).name}")


@dataclass(frozen=True)
class TaskOptions:
    """What a preset and a caller's explicit options settle for one question."""
    system: str | None  # None: the caller's own default (ask and the server: presets.card_system)
    max_new_tokens: int
    think: bool | None  # None: not asked for either way
    json_schema: dict | None  # loaded and parsed


def resolve_options(preset: str | None, *, system: str | None = None, max_new_tokens: int | None = None,
                    think: bool | None = None, json_schema=None, preset_schema: bool = True,
                    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> TaskOptions:
    """preset -> options -> schema: an explicit option (not None) wins, then the preset's value, then
    the default. json_schema: a shipped schema's name, a file, or a parsed dict. preset_schema=False
    when the answer's shape is settled elsewhere (the server's response_format or tools): the
    preset's schema is then left out. InputError in one line for an unknown preset or schema."""
    chosen = apply(get_preset(preset) if preset is not None else None,
                   dict(system=system, max_new_tokens=max_new_tokens, think=think, json_schema=json_schema))
    schema = chosen["json_schema"] if preset_schema else json_schema
    if schema is not None and not isinstance(schema, dict):
        schema = load_schema(schema)
    length = chosen["max_new_tokens"] if chosen["max_new_tokens"] is not None else default_max_new_tokens
    return TaskOptions(chosen["system"], length, chosen["think"], schema)

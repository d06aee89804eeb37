"""The JSON schemas shipped with the package (medgemma_edge/schemas/*.json) and `--json-schema`'s
lookup: a shipped schema's name, or a file of the user's.

Shipped, for the MedGemma 1.5 uses that want machine-readable answers: `lab_report` (a lab report
to a list of results), `cxr_findings` (chest X-ray findings over the CheXpert labels) and `box_2d`
(localization boxes; map them to the picture with medgemma_edge.runtime.boxes).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from medgemma_edge.runtime.constrain import parse_schema
from medgemma_edge.runtime.errors import InputError


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

"""The optional parts of the install (pyproject's extras: `serve`, `export`, `demo`): a command that
needs one says so in one line, naming the `pip install` to run, before doing any work — not with a
traceback halfway through (`No module named 'uvicorn'` after the model has loaded).

What an extra brings is read from the installed distribution's own metadata (its `Requires-Dist`
lines with `extra == "NAME"`, which pip wrote from pyproject.toml), so the list is written once, and
a distribution is looked up by its name there, so no table maps distribution names to import names.
"""

from __future__ import annotations

import re
from importlib import metadata

from medgemma_edge.runtime.errors import MedGemmaEdgeError

DISTRIBUTION = "medgemma-edge"
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")  # name [extras]
_EXTRA_MARKER = re.compile(r"""\bextra\s*==\s*["']([^"']+)["']""")


class MissingExtraError(MedGemmaEdgeError):
    """A command needs an optional part of the install that is not installed."""


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def extra_distributions(extra: str, _seen: frozenset = frozenset()) -> list[str]:
    """Distribution names the extra brings, in pyproject's order; an extra that names another of
    ours (`medgemma-edge[export]`) brings that one's too. Empty where the project is not installed
    (a source tree on sys.path): nothing can be checked there."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    names: list[str] = []
    for requirement in requires:
        spec, _, marker = requirement.partition(";")
        wanted = _EXTRA_MARKER.search(marker)
        if wanted is None or _normalized(wanted.group(1)) != _normalized(extra):
            continue
        name, extras = _REQUIREMENT.match(spec).groups()
        if _normalized(name) != DISTRIBUTION:
            names.append(name)
            continue
        for inner in filter(None, (e.strip() for e in (extras or "").split(","))):
            if inner not in _seen:
                names += extra_distributions(inner, _seen | {extra})
    return list(dict.fromkeys(names))


def missing_distributions(extra: str) -> list[str]:
    """The extra's distributions that are not installed."""
    missing = []
    for name in extra_distributions(extra):
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def require_extra(extra: str, what: str) -> None:
    """MissingExtraError (one line: what needs it, what is missing, the pip command) unless every
    distribution of `extra` is installed. `what` names the thing that needs it ("serve")."""
    missing = missing_distributions(extra)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise MissingExtraError(f"{what} needs the {extra} extra ({shown} not installed) — "
                                f"pip install '{DISTRIBUTION}[{extra}]'")

"""`-m/--model` and `--mmproj`, the same on every command that loads a model; `--speculative` and
`--draft-model` on those that answer (ask, serve)."""

from __future__ import annotations

from pathlib import Path

import click

MODEL_HELP = "bundle folder (`medgemma-edge export` or `import`), a Gemma 3 .gguf, or ollama:NAME[:TAG]"


def model_options(command):
    """Adds `bundle` (-m, or MEDGEMMA_EDGE_MODEL) and `mmproj` parameters to a click command."""
    command = click.option("--mmproj", type=click.Path(dir_okay=False, path_type=Path), default=None,
                           help="the vision projector .gguf that goes with a .gguf given as --model")(command)
    return click.option("-m", "--model", "bundle", type=click.Path(path_type=Path), default=None,
                        envvar="MEDGEMMA_EDGE_MODEL", show_envvar=True, help=MODEL_HELP)(command)


def speculative_options(command):
    """Adds `speculative` and `draft_model` parameters (runtime/spec_choice.py) to a click command."""
    from medgemma_edge.runtime.spec_choice import HELP, MODES

    command = click.option("--draft-model", type=click.Path(dir_okay=False, path_type=Path), default=None,
                           help="a small GGUF sharing the model's vocabulary (Gemma 3 270M for MedGemma 4B) that "
                                "guesses tokens for speculative decoding")(command)
    return click.option("--speculative", type=click.Choice(MODES), default="auto", show_default=True,
                        help=HELP)(command)

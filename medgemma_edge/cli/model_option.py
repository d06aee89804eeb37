"""`-m/--model` and `--mmproj`, the same on every command that loads a model."""

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

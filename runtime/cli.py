"""The `medgemma-edge` command. Each command is a thin wrapper over a library function."""

import sys

import click

from runtime import __version__
from runtime.errors import MedGemmaEdgeError


class _Group(click.Group):
    """Turns the project's own errors into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MedGemmaEdgeError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="medgemma-edge")
def main():
    """Offline MedGemma: export a checkpoint to a bundle, then ask it about images and DICOM."""


# Commands live in their own modules (one concern each) and attach themselves to `main`.
from runtime import cli_ask, cli_export, cli_images  # noqa: E402,F401

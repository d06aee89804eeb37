"""The `medgemma-edge` command. Each command is a thin wrapper over a library function, defined in
its own module and registered here (the command modules do not import this one)."""

import sys

import click

from medgemma_edge.cli.ask import ask
from medgemma_edge.cli.demo import demo
from medgemma_edge.cli.encode import encode
from medgemma_edge.cli.export import export_cmd, verify_cmd
from medgemma_edge.cli.images import preprocess, preview
from medgemma_edge.cli.imports import import_cmd
from medgemma_edge.cli.presets import presets_cmd
from medgemma_edge.cli.serve import serve
from medgemma_edge.runtime import __version__
from medgemma_edge.runtime.errors import MedGemmaEdgeError


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


for command in (demo, ask, encode, export_cmd, import_cmd, verify_cmd, preprocess, preview, presets_cmd, serve):
    main.add_command(command)

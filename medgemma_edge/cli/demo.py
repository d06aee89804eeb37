"""`medgemma-edge demo`: the whole path on the built-in demo bundle, with no files of yours."""

from __future__ import annotations

import click

from medgemma_edge.cli.ask import answer

DEMO_QUESTION = "Describe this CT slice."


@click.command()
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="default: physical cores")
def demo(max_tokens, threads):
    """Ask the built-in demo bundle (built on first use; not MedGemma) about a CT slice shipped
    inside pydicom: DICOM -> windowing -> preprocessing -> export -> runtime, with timings."""
    from pydicom.data import get_testdata_file

    from medgemma_edge.demo import demo_bundle

    bundle = demo_bundle(progress=lambda msg: click.echo(msg, err=True))
    answer(bundle, DEMO_QUESTION, [get_testdata_file("CT_small.dcm")], max_tokens=max_tokens, stats=True,
           threads=threads)

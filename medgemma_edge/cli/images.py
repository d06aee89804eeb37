"""`medgemma-edge preprocess` and `medgemma-edge preview`: the image path, from the shell.

Thin wrappers over the path Model runs: load_pictures -> model_view (-> normalize_views for
`preprocess`), with the same arguments.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from PIL import Image

from medgemma_edge.runtime.dicom.windows import WINDOW_HELP
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES
from medgemma_edge.runtime.sources import load_pictures
from medgemma_edge.runtime.preprocess import DEFAULT_FIT, FITS, IMAGE_SIZE, MAX_SIZE, model_view, normalize_views
from medgemma_edge.runtime.preview import contact_sheet


def _image_options(command):
    options = [
        click.argument("input", type=click.Path(dir_okay=True, path_type=Path)),
        click.option("--fit", type=click.Choice(FITS), default=DEFAULT_FIT, show_default=True,
                     help="pad: centre on black (as in MedGemma training); "
                          "stretch: squash to square (as transformers does)"),
        click.option("--size", type=click.IntRange(1, MAX_SIZE), default=IMAGE_SIZE, show_default=True,
                     help="side of the square the model takes"),
        click.option("--window", default=None,
                     help=WINDOW_HELP),
        click.option("--max-slices", type=click.IntRange(min=1), default=DEFAULT_MAX_SLICES,
                     show_default=True, help="most slices kept from a DICOM series"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command()
@_image_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="where to write the float32 array (.npy)")
def preprocess(input, fit, size, window, max_slices, output):
    """Write the float32 (N, 3, SIZE, SIZE) array the model will receive for INPUT."""
    pictures = load_pictures(str(input), window=window, max_slices=max_slices)
    batch = normalize_views(model_view(pictures, size=size, fit=fit))  # (N, 3, S, S)
    _write(output, lambda fh: np.save(fh, batch))
    click.echo(f"{output}: float32 {tuple(batch.shape)}")


@click.command()
@_image_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="where to write the PNG")
def preview(input, fit, size, window, max_slices, output):
    """Write what the model sees for INPUT as a PNG (a labelled contact sheet for a series)."""
    pictures = load_pictures(str(input), window=window, max_slices=max_slices)
    views = model_view(pictures, size=size, fit=fit)
    if len(views) == 1:
        image = views[0]
    else:
        image = contact_sheet(views, [p.label for p in pictures])
    _write(output, lambda fh: Image.fromarray(image).save(fh, format="PNG"))
    click.echo(f"{output}: {len(views)} picture(s), {image.shape[1]}x{image.shape[0]} PNG")


def _write(path: Path, save) -> None:
    try:
        with open(path, "wb") as fh:
            save(fh)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror or err}) — check the folder exists "
                         "and is writable") from None

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
from medgemma_edge.runtime.pdf import DEFAULT_DPI, DEFAULT_MAX_PAGES, MAX_DPI, MIN_DPI, PdfOptions
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES
from medgemma_edge.runtime.wsi.slide import slide_path
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
        click.option("--pdf-dpi", type=click.FloatRange(MIN_DPI, MAX_DPI), default=DEFAULT_DPI,
                     show_default=True, help="resolution a PDF's pages are rendered at"),
        click.option("--pdf-max-pages", type=click.IntRange(min=1), default=DEFAULT_MAX_PAGES,
                     show_default=True, help="most pages of a PDF; a longer one is refused"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command()
@_image_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="where to write the float32 array (.npy)")
def preprocess(input, fit, size, window, max_slices, pdf_dpi, pdf_max_pages, output):
    """Write the float32 (N, 3, SIZE, SIZE) array the model will receive for INPUT."""
    pictures = load_pictures(str(input), window=window, max_slices=max_slices,
                             pdf=PdfOptions(pdf_dpi, "off", pdf_max_pages))
    batch = normalize_views(model_view(pictures, size=size, fit=fit))  # (N, 3, S, S)
    _write(output, lambda fh: np.save(fh, batch))
    click.echo(f"{output}: float32 {tuple(batch.shape)}")


@click.command()
@_image_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="where to write the PNG")
@click.option("--level", type=click.IntRange(min=0), default=None,
              help="whole-slide image: the pyramid level patches are cut from (default: the one nearest 10X)")
def preview(input, fit, size, window, max_slices, pdf_dpi, pdf_max_pages, output, level):
    """Write what the model sees for INPUT as a PNG (a labelled contact sheet for a series or a
    PDF's pages; for a whole-slide image, its thumbnail with the patch grid, sampled patches numbered)."""
    if slide_path(str(input)) is not None:
        _preview_slide(str(input), max_slices, level, output)
        return
    pictures = load_pictures(str(input), window=window, max_slices=max_slices,
                             pdf=PdfOptions(pdf_dpi, "off", pdf_max_pages))
    views = model_view(pictures, size=size, fit=fit)
    if len(views) == 1:
        image = views[0]
    else:
        image = contact_sheet(views, [p.label for p in pictures])
    _write(output, lambda fh: Image.fromarray(image).save(fh, format="PNG"))
    click.echo(f"{output}: {len(views)} picture(s), {image.shape[1]}x{image.shape[0]} PNG")


def _preview_slide(path: str, max_slices: int, level: int | None, output: Path) -> None:
    from medgemma_edge.runtime.wsi import plan_slide
    from medgemma_edge.runtime.wsi.sheet import slide_sheet

    plan = plan_slide(path, max_slices=max_slices, level=level)
    image = slide_sheet(plan)
    _write(output, lambda fh: Image.fromarray(image).save(fh, format="PNG"))
    click.echo(plan.describe())
    click.echo(f"{output}: slide sheet, {image.shape[1]}x{image.shape[0]} PNG")


def _write(path: Path, save) -> None:
    try:
        with open(path, "wb") as fh:
            save(fh)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror or err}) — check the folder exists "
                         "and is writable") from None

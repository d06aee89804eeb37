"""`medgemma-edge encode`: prepare studies before anyone asks (`Model.prepare` for each), so the
first question about them answers in seconds."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from medgemma_edge.cli.model_option import model_options

from medgemma_edge.runtime.dicom.windows import WINDOW_HELP
from medgemma_edge.runtime.embed_cache import DEFAULT_DISK_MB
from medgemma_edge.runtime.engines import DEFAULT_KV_CACHE, KV_CACHE_HELP, KV_CACHES
from medgemma_edge.runtime.errors import InputError, MedGemmaEdgeError
from medgemma_edge.runtime.files import shown
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES
from medgemma_edge.runtime.preprocess import FIT_HELP, FITS
from medgemma_edge.runtime.presets import RADIOLOGIST

WORKLIST_SUFFIXES = (".txt", ".list")


def read_worklist(path: Path) -> list[str]:
    """One image, DICOM file or series folder a line; blank lines and # comments are skipped;
    relative paths are taken from the worklist's folder."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the worklist {shown(path)} ({err.__class__.__name__}) — "
                         "give a UTF-8 text file with one path a line") from None
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    return [str(p if Path(p).is_absolute() else path.parent / p) for p in entries]


@click.command()
@click.argument("paths", nargs=-1, required=True)
@model_options
@click.option("--image-cache", "image_cache", type=click.Path(file_okay=False, path_type=Path), required=True,
              envvar="MEDGEMMA_EDGE_IMAGE_CACHE", show_envvar=True,
              help="where the prepared studies are kept (holds data derived from patient images)")
@click.option("--image-cache-mb", type=click.FloatRange(min=1), default=DEFAULT_DISK_MB, show_default=True)
@click.option("--system", default=RADIOLOGIST, show_default=True,
              help="the system prompt the questions will use (a prepared study is tied to it)")
@click.option("--window", default=None, help=WINDOW_HELP)
@click.option("--max-slices", type=click.IntRange(min=1), default=DEFAULT_MAX_SLICES, show_default=True)
@click.option("--fit", type=click.Choice(FITS), default=None, help=FIT_HELP)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="default: physical cores")
@click.option("--vision", default="auto", show_default=True,
              help="vision file to run, as in `ask`: auto trusts the fidelity the export measured on its own "
                   "machine (`medgemma-edge verify` names it)")
@click.option("--kv-cache", type=click.Choice(KV_CACHES), default=DEFAULT_KV_CACHE, show_default=True,
              help=KV_CACHE_HELP + "; `ask` and `serve` find a study prepared with q8_0 only when given it too")
@click.option("--level", type=click.IntRange(min=0), default=None,
              help="whole-slide images: the pyramid level patches are cut from, as in `ask` (default: nearest 10X)")
def encode(paths, bundle, mmproj, image_cache, image_cache_mb, system, window, max_slices, fit, threads, vision,
           kv_cache, level):
    """Prepare PATHS (pictures, DICOM files, series folders, or worklists: .txt files with one
    path a line) so that `ask` with the same --image-cache and system prompt starts at the
    question. Already prepared studies are skipped; a bad file is reported and the batch goes on."""
    import medgemma_edge

    if bundle is None:
        raise InputError("no bundle given — pass -m BUNDLE or set MEDGEMMA_EDGE_MODEL")
    items = []
    for p in paths:
        items += read_worklist(Path(p)) if Path(p).suffix.lower() in WORKLIST_SUFFIXES else [p]
    model = medgemma_edge.load(bundle, threads=threads, image_cache_dir=image_cache, image_cache_mb=image_cache_mb,
                               vision=vision, mmproj=mmproj, kv_cache=kv_cache)
    done = skipped = failed = 0
    t_all = time.perf_counter()
    for i, path in enumerate(items, 1):
        t0 = time.perf_counter()
        try:
            source = _slide_patches(path, level, max_slices)
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": [{"type": "image", "image": source}]}]
            stats = model.prepare(messages, window=window, max_slices=max_slices, fit=fit)
        except MedGemmaEdgeError as err:
            failed += 1
            click.echo(f"[{i}/{len(items)}] {shown(path)}: error: {err}", err=True)
            continue
        if stats.restored_tokens and not stats.image_encode_s:
            skipped += 1
            click.echo(f"[{i}/{len(items)}] {shown(path)}: already prepared", err=True)
        else:
            done += 1
            click.echo(f"[{i}/{len(items)}] {shown(path)}: {stats.images} picture(s) prepared in "
                       f"{time.perf_counter() - t0:.1f} s", err=True)
        sys.stderr.flush()
    click.echo(f"prepared {done}, already prepared {skipped}, failed {failed} "
               f"({time.perf_counter() - t_all:.1f} s)")
    if failed:
        sys.exit(2)


def _slide_patches(path, level, max_slices):
    """A whole-slide image's patches cut at --level (read here, as `ask` reads them); any other path as it is."""
    if level is None:
        return path
    from medgemma_edge.runtime.wsi import load_slide, slide_path

    return load_slide(path, max_slices=max_slices, level=level) if slide_path(path) is not None else path

"""`medgemma-edge import`: a bundle from GGUFs people already have (runtime/gguf_import.py)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("import")
@click.argument("source")
@click.option("--mmproj", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the vision projector .gguf (default: the mmproj-….gguf found beside a folder's model)")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="the bundle folder to write (new or empty)")
@click.option("--quant", default=None, help="which quant of a folder holding several (q4_k_m, q8_0, …)")
@click.option("--copy", is_flag=True,
              help="copy the files where a hard link cannot be made (another file system)")
def import_cmd(source, mmproj, out, quant, copy):
    """Make bundle OUT from SOURCE: a Gemma 3 text .gguf (with --mmproj), a folder holding one (LM
    Studio's models folder, a downloaded GGUF repository), or ollama:NAME[:TAG].

    The bundle's files are hard links to yours (nothing is moved or rewritten); --copy copies them
    where a link cannot be made. Imported bundles carry no quality report."""
    from medgemma_edge.runtime.cache import cache_root
    from medgemma_edge.runtime.gguf_check import no_quality_line
    from medgemma_edge.runtime.gguf_import import import_gguf
    from medgemma_edge.runtime.model import VERIFIED_FILES

    try:
        remember = cache_root() / VERIFIED_FILES
    except OSError:
        remember = None
    last = [""]

    def progress(line: str) -> None:
        if line.split(":")[0] != last[0].split(":")[0] or line.endswith(" MB") and line != last[0]:
            click.echo(line, err=True)
        last[0] = line

    res = import_gguf(source, out, mmproj=mmproj, quant=quant, copy=copy, remember=remember, progress=progress)
    for note in res.notes:
        click.echo(note)
    m = res.manifest
    files = ", ".join(f"{f['role']} {f['path']} ({f['size'] / 1e6:,.0f} MB)" for f in m["files"])
    click.echo(f"bundle: {res.bundle} ({'hard links' if res.linked else 'copies'}: {files})")
    image = m["image"]
    click.echo(f"gemma3 {m['quantization']['text']}, context {m['context_length']}, "
               + (f"images {image['size']} px as {image['tokens_per_image']} tokens" if image else "text only")
               + ", chat template " + ("from the GGUF" if m["chat_template"] else "built in (the GGUF has none)"))
    click.echo(no_quality_line(m))

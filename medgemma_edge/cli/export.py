"""`medgemma-edge export` and `medgemma-edge verify`: thin wrappers over export.bundle and runtime.manifest.

`export` needs the export extras (torch, safetensors, sentencepiece); they are imported only when
the command runs, so the runtime CLI starts without them.
"""

from __future__ import annotations

import click

from medgemma_edge.export.quants import DEFAULT_VISION_QUANTS, TEXT_QUANTS, VISION_QUANTS
from medgemma_edge.runtime.errors import ExportError


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


@click.command("export")
@click.argument("src", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Bundle folder to write.")
@click.option("--format", "fmt", type=click.Choice(["gguf"]), default="gguf", show_default=True)
@click.option("--quant", type=click.Choice(TEXT_QUANTS), default="q4_k_m", show_default=True,
              help="Text model weights.")
@click.option("--vision-quant", type=click.Choice(VISION_QUANTS), multiple=True, default=DEFAULT_VISION_QUANTS,
              show_default=True,
              help="Vision tower file(s); repeat for several: GGUF mmproj (f32/f16/q8_0, run by llama.cpp) or "
                   "ONNX (onnx-f32, onnx-int8: run by onnxruntime). The runtime picks the fastest faithful "
                   "one on its machine (load(vision='auto')).")
@click.option("--keep-intermediate", is_flag=True, help="Keep the unquantized GGUFs in <out>/intermediate.")
@click.option("--no-quality", is_flag=True, help="Skip the quantization report (faster).")
@click.option("--threads", type=int, default=0, help="Threads for quantization and the report (0: all).")
@click.option("--force", is_flag=True, help="Replace a bundle already in the output folder.")
def export_cmd(src, out, fmt, quant, vision_quant, keep_intermediate, no_quality, threads, force):
    """Export the local Hugging Face checkpoint SRC (MedGemma / Gemma 3) to a bundle."""
    try:
        from medgemma_edge.export.bundle import export_gguf
    except ImportError as err:
        raise ExportError(f"export needs the export extras ({err.name} is missing): "
                          "pip install 'medgemma-edge[export]'") from None
    res = export_gguf(src, out, quant, vision_quant, keep_intermediate=keep_intermediate,
                      quality=not no_quality, threads=threads, overwrite=force)
    from medgemma_edge.export.quality import summary_lines

    click.echo(f"bundle: {res.bundle}")
    for f in res.manifest["files"]:
        click.echo(f"  {f['role']:6s} {f['path']}  {_mb(f['size'])}")
    v = res.manifest["vocab"]
    if v["padded"]:
        click.echo(f"  vocab: {v['tokenizer_entries']} tokenizer entries padded to {v['embedding_rows']} "
                   "embedding rows with unused placeholders")
    elif v["tokenizer_entries"] > v["embedding_rows"]:
        click.echo(f"  vocab: {v['tokenizer_entries'] - v['embedding_rows']} added token(s) without an "
                   f"embedding row left out ({v['embedding_rows']} rows)")
    for line in summary_lines(res.manifest["quality"]):
        click.echo(line)
    stages = {"write": "writing", "quantize": "after llama.cpp's quantizer", "quality": "after the quality check"}
    peaks = ", ".join(f"{mb:,.0f} MB {stages[k]}" for k, mb in res.peak_mb.items())
    click.echo(f"took {res.seconds:.1f} s; peak memory {peaks}")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=str))
def verify_cmd(bundle):
    """Check every file of BUNDLE against its manifest (size and sha256)."""
    from medgemma_edge.runtime.manifest import verify_bundle

    manifest = verify_bundle(bundle)
    total = sum(f["size"] for f in manifest["files"])
    click.echo(f"ok: {len(manifest['files'])} files, {_mb(total)}, match {bundle}/manifest.json")

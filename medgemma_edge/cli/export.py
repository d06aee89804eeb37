"""`medgemma-edge export` and `medgemma-edge verify`: thin wrappers over export.bundle (GGUF),
export.bundle_onnx (ONNX) and runtime.manifest.

`export` needs the export extra (torch, safetensors, sentencepiece, ...): it is imported only when
the command runs, so the runtime CLI starts without it, and without it `export` says so in one line
(medgemma_edge/extras.py) before any work.
"""

from __future__ import annotations

import click

from medgemma_edge.export.quants import (DEFAULT_TEXT_QUANT, DEFAULT_VISION_QUANTS, FORMATS, GGUF_VISION_QUANTS,
                                         ONNX_TEXT_QUANTS, ONNX_VISION_QUANTS, TEXT_QUANTS, VISION_QUANTS)
from medgemma_edge.extras import require_extra
from medgemma_edge.runtime.errors import InputError

QUANTS = {"gguf": TEXT_QUANTS, "onnx": ONNX_TEXT_QUANTS}


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


@click.command("export")
@click.argument("src", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--out", default=None, type=click.Path(path_type=str),
              help="Bundle folder to write (required unless only --lora-out is wanted).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="gguf", show_default=True,
              help="gguf: llama.cpp runs the text model; onnx: onnxruntime runs everything (CPU or CUDA).")
@click.option("--quant", type=click.Choice(tuple(dict.fromkeys(TEXT_QUANTS + ONNX_TEXT_QUANTS))), default=None,
              help=f"Text model weights. gguf: {', '.join(TEXT_QUANTS)} (default {DEFAULT_TEXT_QUANT['gguf']}); "
                   f"onnx: {', '.join(ONNX_TEXT_QUANTS)} (default {DEFAULT_TEXT_QUANT['onnx']}).")
@click.option("--vision-quant", type=click.Choice(VISION_QUANTS), multiple=True, default=(),
              help=f"Vision tower file(s); repeat for several: GGUF mmproj ({', '.join(GGUF_VISION_QUANTS)}: run by "
                   f"llama.cpp; gguf bundles only) or ONNX ({', '.join(ONNX_VISION_QUANTS)}: run by onnxruntime). "
                   f"The runtime picks the fastest faithful one on its machine. Default: "
                   f"{' '.join(DEFAULT_VISION_QUANTS)} (onnx bundles: the ONNX ones of that list).")
@click.option("--keep-intermediate", is_flag=True, help="Keep the unquantized references in <out>/intermediate.")
@click.option("--no-quality", is_flag=True, help="Skip the quantization report (faster).")
@click.option("--threads", type=int, default=0, help="Threads for quantization and the report (0: all).")
@click.option("--force", is_flag=True, help="Replace a bundle already in the output folder.")
@click.option("--adapter", type=click.Path(file_okay=False, path_type=str), default=None,
              help="PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) merged into the weights.")
@click.option("--lora-out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Instead of merging --adapter, write it as a llama.cpp LoRA GGUF to this file, for "
                   "`ask --lora` / load(lora=) on the base bundle (with -o: the base bundle is exported too).")
def export_cmd(src, out, fmt, quant, vision_quant, keep_intermediate, no_quality, threads, force, adapter, lora_out):
    """Export the local Hugging Face checkpoint SRC (MedGemma / Gemma 3) to a bundle."""
    require_extra("export", "export")  # before any work: one line, not torch's ImportError
    if lora_out is not None:
        if adapter is None:
            raise InputError("--lora-out needs --adapter DIR, the PEFT LoRA folder to convert")
        if fmt != "gguf":
            raise InputError("--lora-out writes a llama.cpp LoRA, for gguf bundles only; with --format onnx "
                             "merge the adapter (--adapter without --lora-out)")
        from medgemma_edge.export.gguf_lora import export_lora

        click.echo(f"lora: {export_lora(src, adapter, lora_out)}")
        adapter = None  # the bundle, if any, is the base the LoRA applies to
        if out is None:
            return
    if out is None:
        raise InputError("missing -o/--out: the bundle folder to write")
    quant = quant or DEFAULT_TEXT_QUANT[fmt]
    if quant not in QUANTS[fmt]:
        raise InputError(f"--quant {quant} does not apply to --format {fmt}, which takes {', '.join(QUANTS[fmt])}")
    if fmt == "onnx" and any(v not in ONNX_VISION_QUANTS for v in vision_quant):
        bad = next(v for v in vision_quant if v not in ONNX_VISION_QUANTS)
        raise InputError(f"--vision-quant {bad} is a GGUF mmproj, which an onnx bundle cannot run; "
                         f"--format onnx takes {', '.join(ONNX_VISION_QUANTS)}")
    if fmt == "onnx":
        if adapter is None:
            from medgemma_edge.export.bundle_onnx import export_onnx
        else:  # the decoder builder reads a folder: a merged copy of SRC is exported
            from functools import partial

            from medgemma_edge.export.lora_hf import export_onnx_merged

            export_onnx = partial(export_onnx_merged, adapter=adapter)
        res = export_onnx(src, out, quant, vision_quant or None, quality=not no_quality, threads=threads,
                          overwrite=force, keep_intermediate=keep_intermediate)
    else:
        from medgemma_edge.export.bundle import export_gguf

        res = export_gguf(src, out, quant, vision_quant or None, keep_intermediate=keep_intermediate,
                          quality=not no_quality, threads=threads, overwrite=force, adapter=adapter)
    from medgemma_edge.export.quality import summary_lines

    click.echo(f"bundle: {res.bundle}")
    for f in res.manifest["files"]:
        click.echo(f"  {f['role']:10s} {f['path']}  {_mb(f['size'])}")
    if probe := res.manifest.get("selfcheck"):  # what `verify --run` and `serve` compare with
        click.echo(f"  {'selfcheck':10s} {probe['path']}  {probe['size'] / 1e3:,.0f} KB (the self-check's probe)")
    v = res.manifest["vocab"]
    if v["padded"]:
        click.echo(f"  vocab: {v['tokenizer_entries']} tokenizer entries padded to {v['embedding_rows']} "
                   "embedding rows with unused placeholders")
    elif v["tokenizer_entries"] > v["embedding_rows"]:
        click.echo(f"  vocab: {v['tokenizer_entries'] - v['embedding_rows']} added token(s) without an "
                   f"embedding row left out ({v['embedding_rows']} rows)")
    for line in summary_lines(res.manifest["quality"]):
        click.echo(line)
    _say_where_measured(res.manifest)
    stages = {"write": "writing", "quantize": "after llama.cpp's quantizer", "quality": "after the quality check"}
    peaks = ", ".join(f"{mb:,.0f} MB {stages[k]}" for k, mb in res.peak_mb.items())
    click.echo(f"took {res.seconds:.1f} s; peak memory {peaks}")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--run", "run_probe", is_flag=True,
              help="also run the self-check: the bundle's built-in picture and prompt on this machine, compared "
                   "with what the export measured (one image encode); exit 2 naming the damage on a mismatch")
@click.option("--vision", default="auto", show_default=True,
              help="with --run: the vision file to check (an encoding the bundle holds; auto: the one this "
                   "machine runs)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="with --run (default: physical cores)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="with --run")
def verify_cmd(bundle, run_probe, vision, threads, device):
    """Check every file of BUNDLE against its manifest (size and sha256); with --run, that the model
    still sees and speaks on this machine as where it was exported (docs/export.md#the-self-check)."""
    from medgemma_edge.runtime.manifest import listed_files, verify_bundle

    manifest = verify_bundle(bundle)
    files = listed_files(manifest)
    click.echo(f"ok: {len(files)} files, {_mb(sum(f['size'] for f in files))}, match {bundle}/manifest.json")
    _say_where_measured(manifest)
    from medgemma_edge.runtime.gguf_check import no_quality_line

    if line := no_quality_line(manifest):
        click.echo(line)
    if run_probe:
        self_check(bundle, vision=vision, threads=threads, device=device)


def self_check(bundle, **load_options) -> None:
    """Load BUNDLE, run the self-check and print one line per check; BundleError (exit 2, one line
    naming the damage) on a failure."""
    import medgemma_edge
    from medgemma_edge.runtime.selfcheck import check_or_raise, summary

    say = lambda line: click.echo(f"self-check: {line}")  # noqa: E731
    say(summary(check_or_raise(medgemma_edge.load(bundle, **load_options), say=say)))


def _say_where_measured(manifest: dict) -> None:
    """The machine the vision fidelity was measured on: `--vision auto` elsewhere relies on it."""
    from medgemma_edge.runtime.vision_choice import measured_on

    line = measured_on(manifest)
    if line:
        click.echo(f"{line}; `--vision auto` on other machines relies on it")

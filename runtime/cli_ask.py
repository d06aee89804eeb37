"""`medgemma-edge ask`: one question, optional images or DICOM, a streamed answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runtime.cli import main
from runtime.inputs import DEFAULT_MAX_SLICES
from runtime.preprocess import FITS

RADIOLOGIST = "You are an expert radiologist."  # the model card's system prompt for image tasks
ASSISTANT = "You are a helpful medical assistant."  # ... and for text tasks


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", "bundle", type=click.Path(path_type=Path), default=None,
              help="bundle folder made by `medgemma-edge export` (default: the built-in demo bundle)")
@click.option("--image", "images", multiple=True,
              help="picture, DICOM file or DICOM series folder; repeat for several")
@click.option("--system", default=None, help="system prompt (default: the model card's advice)")
@click.option("--think", is_flag=True, help="let the model think first (MedGemma 1.5 / 27B)")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 is greedy decoding, the model card's advice")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stats", is_flag=True, help="print per-stage timings to stderr")
@click.option("--window", default=None, help="CT window preset or lo:hi,lo:hi,lo:hi (DICOM only)")
@click.option("--max-slices", type=click.IntRange(min=1), default=DEFAULT_MAX_SLICES, show_default=True,
              help="most slices taken from a CT/MR series (fewer is faster on a CPU)")
@click.option("--fit", type=click.Choice(FITS), default=None, help="pad (default) or stretch to square")
@click.option("--context", type=click.IntRange(min=256), default=None,
              help="context length in tokens (default: grows to what the prompt needs)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="default: physical cores")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--image-cache", "image_cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="MEDGEMMA_EDGE_IMAGE_CACHE", show_envvar=True,
              help="also keep image embeddings in this folder, so the same image is not encoded again "
                   "(holds data derived from patient images; off by default)")
@click.option("--image-cache-mb", type=click.FloatRange(min=1), default=2048, show_default=True,
              help="size limit of the --image-cache folder; least recently used images go first")
def ask(prompt, bundle, images, system, think, max_tokens, temperature, top_p, top_k, seed, stats,
        window, max_slices, fit, context, threads, device, image_cache, image_cache_mb):
    """Ask PROMPT, about the given images if any; the answer streams to stdout."""
    import runtime

    if bundle is None:
        from runtime.demo import demo_bundle

        bundle = demo_bundle(progress=lambda msg: click.echo(msg, err=True))
    model = runtime.load(bundle, device=device, threads=threads, context=context, fit=fit,
                         image_cache_dir=image_cache, image_cache_mb=image_cache_mb)
    content = [{"type": "image", "image": src} for src in images] + [{"type": "text", "text": prompt}]
    messages = [{"role": "system", "content": system or (RADIOLOGIST if images else ASSISTANT)},
                {"role": "user", "content": content}]
    if model.demo_notice:  # on stdout, so it travels with the answer wherever it is piped
        click.echo(f"[{model.demo_notice}]")
    run = model.chat(messages, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                     top_k=top_k, seed=seed, think=think, stream=True, window=window,
                     max_slices=max_slices)
    for piece in run:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    reply = run.reply
    if think and reply.thought:
        click.echo(f"[thought] {reply.thought}", err=True)
    if model.demo_notice:
        click.echo(f"[{model.demo_notice}]", err=True)
    if stats:
        shown = {"finish_reason": reply.finish_reason, "prompt_tokens": reply.prompt_tokens,
                 "completion_tokens": reply.completion_tokens, **reply.stats}
        click.echo("stats " + json.dumps(shown), err=True)


"""`medgemma-edge ask`: one question, optional images or DICOM, a streamed answer."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from medgemma_edge.cli.model_option import model_options, speculative_options
from medgemma_edge.cli.progress import ProgressLines

from medgemma_edge.runtime.dicom.windows import WINDOW_HELP
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.pdf import DEFAULT_DPI, DEFAULT_MAX_PAGES, MAX_DPI, MIN_DPI, TEXT_HELP, TEXT_MODES, PdfOptions
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES
from medgemma_edge.runtime.embed_cache import DEFAULT_DISK_MB
from medgemma_edge.runtime.engines import DEFAULT_KV_CACHE, KV_CACHE_HELP, KV_CACHES
from medgemma_edge.runtime.generate import DEFAULT_MAX_NEW_TOKENS
from medgemma_edge.runtime.preprocess import FIT_HELP, FITS
from medgemma_edge.runtime.presets import card_system
from medgemma_edge.runtime.progress import Progress


# A positional argument with one of these endings is meant as a file, even when it does not exist
# (then it is refused by name instead of being asked to the model as a question).
_FILE_ENDINGS = (".pdf", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".svs",
                 ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")


@click.command()
@click.argument("args", nargs=-1, metavar="[FILE]... [PROMPT]")
@model_options
@click.option("--image", "images", multiple=True,
              help="picture, DICOM file or series folder, whole-slide image (docs/wsi.md) or PDF (docs/documents.md); "
                   "repeat for several")
@click.option("--prior", default=None,
              help="an earlier X-ray beside the one --image gives (one picture each): Google's longitudinal "
                   "CXR layout, prior then current then PROMPT, no system prompt unless --system")
@click.option("--preset", default=None,
              help="a task's system prompt, length, thinking and schema (list: `medgemma-edge presets`); "
                   "options given here override it")
@click.option("--system", default=None, help="system prompt (default: the preset's, else the model card's advice)")
@click.option("--think/--no-think", default=None, help="let the model think first (MedGemma 1.5 / 27B)")
@click.option("--json-schema", "json_schema", default=None,
              help="answer as JSON valid for this schema: a file, or a shipped one (lab_report, cxr_findings, box_2d)")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help=f"default: the preset's, else {DEFAULT_MAX_NEW_TOKENS}")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 is greedy decoding, the model card's advice")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--repetition-guard/--no-repetition-guard", default=True, show_default=True,
              help="stop an answer that loops (a token 32 times, a phrase 3 times: docs/cli.md); "
                   "finish_reason repetition")
@click.option("--stats", is_flag=True, help="print per-stage timings to stderr")
@click.option("--window", default=None, help=WINDOW_HELP)
@click.option("--max-slices", type=click.IntRange(min=1), default=DEFAULT_MAX_SLICES, show_default=True,
              help="most slices taken from a CT/MR series, or patches from a whole-slide image (at most 125; fewer is faster on a CPU)")
@click.option("--level", type=click.IntRange(min=0), default=None,
              help="whole-slide image: the pyramid level patches are cut from (default: the one nearest 10X, 1 µm/px)")
@click.option("--pdf-dpi", type=click.FloatRange(MIN_DPI, MAX_DPI), default=DEFAULT_DPI, show_default=True,
              help="resolution a PDF's pages are rendered at (96: a Letter/A4 page's long side just above the model's 896)")
@click.option("--pdf-text", type=click.Choice(TEXT_MODES), default="auto", show_default=True, help=TEXT_HELP)
@click.option("--pdf-max-pages", type=click.IntRange(min=1), default=DEFAULT_MAX_PAGES, show_default=True,
              help="most pages of a PDF (each is one image); a longer PDF is refused, not cut")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=None,
              help="seconds of image encoding a CT/MR series may take: fewer slices (same sampling rule) "
                   "at this machine's measured speed; slices in the image cache cost nothing")
@click.option("--fit", type=click.Choice(FITS), default=None, help=FIT_HELP)
@click.option("--context", type=click.IntRange(min=256), default=None,
              help="context length in tokens (default: grows to what the prompt needs)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="default: physical cores")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--vision", default="auto", show_default=True,
              help="which of the bundle's vision files runs: auto (the fastest faithful one on this machine, "
                   "by the fidelity the export measured on its own machine: `medgemma-edge verify` names it) "
                   "or an encoding it holds (f16, onnx-int8, ...); one this CPU cannot run faithfully is refused")
@click.option("--repack-weights/--no-repack-weights", "repack", default=None,
              help="llama.cpp's weights repacked for this CPU (faster decode on AVX-512), read without mmap so they "
                   "are held once but not shared with other processes through the page cache; default: on the "
                   "CPU kinds where it was measured to pay at the same memory (benchmarks/results/REPACK.md)")
@click.option("--kv-cache", type=click.Choice(KV_CACHES), default=DEFAULT_KV_CACHE, show_default=True,
              help=KV_CACHE_HELP)
@speculative_options
@click.option("--lora", "loras", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="llama.cpp LoRA file made for this bundle (export SRC --adapter DIR --lora-out FILE); repeatable")
@click.option("--image-cache", "image_cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="MEDGEMMA_EDGE_IMAGE_CACHE", show_envvar=True,
              help="also keep image embeddings in this folder, so the same image is not encoded again "
                   "(holds data derived from patient images; off by default)")
@click.option("--image-cache-mb", type=click.FloatRange(min=1), default=DEFAULT_DISK_MB, show_default=True,
              help="size limit of the --image-cache folder; least recently used images go first")
def ask(args, bundle, mmproj, images, prior, preset, system, think, json_schema, max_tokens, temperature, top_p, top_k, seed, repetition_guard, stats,
        window, max_slices, budget, fit, context, threads, device, vision, repack, image_cache, image_cache_mb, loras,
        pdf_dpi, pdf_text, pdf_max_pages, level, kv_cache, speculative, draft_model):
    """Ask PROMPT, about the given images if any; the answer streams to stdout. FILEs before PROMPT are
    inputs as --image gives them (`ask --preset lab-report report.pdf`). PROMPT may be left out with
    a preset that has a question of its own (longitudinal-cxr, lab-report)."""
    from medgemma_edge.runtime.constrain import schema_to_gbnf
    from medgemma_edge.structured import resolve_options

    files, prompt = _positional(args)
    images = (*images, *files)
    chosen = resolve_options(preset, system=system, think=think, max_new_tokens=max_tokens, json_schema=json_schema)
    prompt, images, prior = _question(prompt, preset, images, prior, window)
    if chosen.json_schema is not None:
        schema_to_gbnf(chosen.json_schema)  # a schema the grammar cannot take is refused before the model loads
    if bundle is None:
        raise InputError("no bundle given — pass -m BUNDLE (a folder made by `medgemma-edge export`) or set "
                         "MEDGEMMA_EDGE_MODEL; to try the installation, run `medgemma-edge demo`")
    answer(bundle, prompt, images, system=chosen.system, think=bool(chosen.think),
           max_tokens=chosen.max_new_tokens, json_schema=chosen.json_schema, temperature=temperature,
           top_p=top_p, top_k=top_k, seed=seed, repetition_guard=repetition_guard, stats=stats, window=window,
           max_slices=max_slices, fit=fit, context=context, threads=threads, device=device, image_cache=image_cache,
           image_cache_mb=image_cache_mb,
           budget=budget, vision=vision, repack=repack, lora=loras, mmproj=mmproj, prior=prior,
           pdf=PdfOptions(pdf_dpi, pdf_text, pdf_max_pages), level=level, kv_cache=kv_cache,
           speculative=speculative, draft_model=draft_model)


def _json_answer(text: str, json_schema, last) -> str:
    """The whole JSON answer; one cut by --max-tokens (or stopped in a loop) closed at its last complete
    entry, said on stderr."""
    from medgemma_edge.runtime.generate import CUT

    if last.finish_reason not in CUT:
        return text
    from medgemma_edge.runtime.json_close import close_cut_answer

    why, fix = ("reached --max-tokens", "raise --max-tokens") if last.finish_reason == "length" else \
        ("was stopped repeating itself", "--no-repetition-guard lets it run on")
    text = close_cut_answer(text, json_schema, last.stats)
    if last.stats.json_closed is None:
        click.echo(f"[the answer {why} and is not complete JSON — {fix}]", err=True)
    else:
        click.echo(f"[the answer {why}: closed after its last complete entry "
                   f"({last.stats.json_closed} characters dropped) — {fix} for all of it]", err=True)
    return text


def _positional(args: tuple[str, ...]) -> tuple[list[str], str | None]:
    """(input files, PROMPT): every argument naming an existing file or folder, or ending as a file
    does, is an input; at most one other is the question."""
    files, words = [], []
    for arg in args:
        if os.path.exists(arg):  # False (not an error) for a long question too
            files.append(arg)
        elif arg.lower().endswith(_FILE_ENDINGS) and " " not in arg:
            raise InputError(f"no such file: {arg} — check the path (a question is given in quotes)")
        else:
            words.append(arg)
    if len(words) > 1:
        raise InputError(f"PROMPT must be one argument, got {len(words)} — put the question in quotes")
    return files, words[0] if words else None


def _question(prompt, preset, images, prior, window) -> tuple:
    """(PROMPT or the preset's own question, images, prior); with --prior, the one --image and the
    prior each decoded here as the one picture it must be."""
    from medgemma_edge.runtime.presets import get_preset

    if prompt is None:
        prompt = get_preset(preset).question if preset is not None else None
        if prompt is None:
            raise InputError("no question given — pass PROMPT (or a preset with its own: longitudinal-cxr, lab-report)")
    if prior is not None:
        from medgemma_edge.longitudinal import one_picture

        if len(images) != 1:
            raise InputError(f"--prior needs exactly one --image (the current X-ray), got {len(images)}")
        images, prior = [one_picture(images[0], "--image", window=window)], one_picture(prior, "--prior", window=window)
    return prompt, images, prior


def _fit_budget(model, images, budget, window, fit, max_slices) -> list:
    """`images` with each DICOM series replaced by its slices that fit --budget (one line on stderr
    each), decoded once by the plan for the answer too."""
    from medgemma_edge.runtime.budget import plan_slices
    from medgemma_edge.runtime.sources import is_dicom_path

    fitted = []
    for src in images:
        if not is_dicom_path(src):
            fitted.append(src)
            continue
        plan = plan_slices(model, src, budget, window=window, fit=fit, max_slices=max_slices)
        if plan.total > 1:
            click.echo(plan.describe(budget), err=True)
        fitted.append(plan.pictures)
    return fitted


def _slides(model, images, *, level, max_slices, budget, fit) -> tuple[list, bool]:
    """`images` with each whole-slide image replaced by its sampled tissue patches (one line on
    stderr each), and whether there was one."""
    from medgemma_edge.runtime.budget import plan_slices
    from medgemma_edge.runtime.wsi import plan_slide, read_patches, slide_path

    out, found = [], False
    for src in images:
        if slide_path(src) is None:
            out.append(src)
            continue
        found = True
        if budget is not None:
            plan = plan_slices(model, src, budget, fit=fit, max_slices=max_slices, level=level)
            click.echo(plan.describe(budget).replace("slices", "patches"), err=True)
            out.append(plan.pictures)
        else:
            plan = plan_slide(src, max_slices=max_slices, level=level)
            click.echo(plan.describe(), err=True)
            out.append(read_patches(plan))
    return out, found


def _items(src, pdf) -> list[dict]:
    """The content items of one --image: a PDF is read here, with the --pdf options (its pages, or
    with --pdf-text only its text); anything else is decoded by the model as it is."""
    from medgemma_edge.runtime.sources import is_pdf

    if pdf is not None and is_pdf(src):
        from medgemma_edge.runtime.pdf import pdf_content

        return pdf_content(src, pdf)
    return [{"type": "image", "image": src}]


def answer(bundle, prompt, images=(), *, system=None, think=False, max_tokens=DEFAULT_MAX_NEW_TOKENS,
           temperature=0.0, top_p=1.0, top_k=0, seed=None, repetition_guard=True, stats=False, window=None,
           max_slices=DEFAULT_MAX_SLICES,
           fit=None, context=None, threads=None, device="auto", image_cache=None, image_cache_mb=DEFAULT_DISK_MB, budget=None, vision="auto",
           repack="auto", json_schema=None, lora=(), mmproj=None, prior=None, pdf=None, level=None,
           kv_cache=DEFAULT_KV_CACHE, speculative="auto", draft_model=None) -> None:
    """Load `bundle`, stream the answer to `prompt` to stdout; what `ask` and `demo` run. With
    `prior`: Google's longitudinal layout (medgemma_edge/longitudinal.py), a system prompt only if given."""
    import medgemma_edge

    model = medgemma_edge.load(bundle, device=device, threads=threads, context=context, fit=fit,
                               image_cache_dir=image_cache, image_cache_mb=image_cache_mb, vision=vision,
                               repack="auto" if repack is None else repack, lora=lora, mmproj=mmproj,
                               kv_cache=kv_cache, speculative=speculative, draft_model=draft_model)
    if model.demo_notice:  # on stdout, so it travels with the answer wherever it is piped
        click.echo(f"[{model.demo_notice}]")
    sources, slide = _slides(model, images, level=level, max_slices=max_slices, budget=budget, fit=fit)
    sources = _fit_budget(model, sources, budget, window, fit, max_slices) if budget is not None else sources
    content = [item for src in sources for item in _items(src, pdf)] + [{"type": "text", "text": prompt}]
    if slide:  # Google's notebook: the question, then the patches
        content = content[-1:] + content[:-1]
    has_images = any(item["type"] == "image" for item in content)
    messages = [{"role": "system", "content": system or card_system(has_images)},
                {"role": "user", "content": content}]
    if slide and system is None:  # ... and no system prompt
        messages = messages[1:]
    if prior is not None:
        from medgemma_edge.longitudinal import longitudinal_messages

        messages = longitudinal_messages(sources[0], prior, prompt, system=system)
    bars = ProgressLines()  # before the first token: images encoded, prompt read (stderr)
    held = []  # a JSON answer is printed whole, closed if the token limit cut it (runtime/json_close.py)
    for r in model.stream(messages, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          seed=seed, think=think, window=window, max_slices=max_slices, json_schema=json_schema,
                          repetition_guard=repetition_guard, progress=True):
        if isinstance(r, Progress):
            bars.show(r)
            continue
        bars.close()
        if json_schema is not None:
            held.append(r.text)
            continue
        click.echo(r.text, nl=False)
        sys.stdout.flush()
    if json_schema is not None:
        click.echo(_json_answer("".join(held), json_schema, r), nl=False)
    click.echo()
    if r.finish_reason == "repetition" and json_schema is None:
        click.echo(f"[stopped: the answer was repeating {r.stats.repetition_period} tokens over and over — "
                   "--no-repetition-guard lets it run on]", err=True)
    for box in r.boxes:  # on the one picture asked about, as given (runtime/boxes.py)
        click.echo(box.describe(), err=True)
    if think and r.thought:
        click.echo(f"[thought] {r.thought}", err=True)
    if model.demo_notice:
        click.echo(f"[{model.demo_notice}]", err=True)
    if stats:
        shown = {"finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                 "completion_tokens": r.completion_tokens, **r.stats.as_dict()}
        click.echo("stats " + json.dumps(shown), err=True)
        from medgemma_edge.runtime.gguf_check import imported, no_quality_line

        if imported(model.manifest):
            click.echo(no_quality_line(model.manifest), err=True)

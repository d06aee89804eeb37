"""checkpoint dir → GGUF bundle dir (text GGUF, vision mmproj, manifest.json).

Orchestration only: reading is export/checkpoint + export/vocab, writing export/gguf_text and
export/gguf_vision, K-quants export/quantize, the report export/quality, the manifest
runtime/manifest.

Order of work: the GGUFs gguf-py writes itself (final file, and the unquantized reference when a
quality report or a K-quant needs one) → llama.cpp's quantizer for K-quants → the quality report
→ intermediates removed → manifest written last, so a folder without manifest.json is never a
half-made bundle that loads.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_edge.export.checkpoint import Checkpoint, open_checkpoint
from medgemma_edge.export.config import TextConfig, VisionConfig, check_text, check_vision
from medgemma_edge.export.quants import DEFAULT_TEXT_QUANT, DEFAULT_VISION_QUANTS, K_QUANTS, TEXT_QUANTS, VISION_QUANTS
from medgemma_edge.runtime.errors import ExportError
from medgemma_edge.runtime.memory import peak_rss_mb

DEFAULT_QUANT = DEFAULT_TEXT_QUANT["gguf"]
INTERMEDIATE_DIR = "intermediate"


@dataclass
class ExportResult:
    bundle: Path
    manifest: dict
    seconds: float
    # peak resident memory (MB) after each stage; the process peak only grows
    peak_mb: dict[str, float] = field(default_factory=dict)  # "write", "quantize", "quality"


def reference_type(ckpt: Checkpoint, part: str = "text") -> str:
    """The GGUF type that holds every source tensor of `part` exactly (the quality reference)."""
    dtypes = {ref.dtype for (p, _), ref in ckpt.tensors.items() if p == part}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= {"bf16", "f16"} else "f32"


def _shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    return {(n if p == "text" else f"{p}/{n}"): r.shape for (p, n), r in ckpt.tensors.items()}


def _read_preprocessor(src: Path) -> dict | None:
    path = src / "preprocessor_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def prepare_out(out: Path, overwrite: bool) -> Path:
    """An empty bundle folder; with `overwrite`, the files of a bundle already there are removed
    (only those its manifest lists, and its intermediate folder: nothing else of the user's)."""
    from medgemma_edge.runtime.manifest import MANIFEST_NAME, listed_files, read_manifest

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} is not empty; choose a new folder or pass --force to replace its bundle")
        if (out / MANIFEST_NAME).is_file():
            try:
                for f in listed_files(read_manifest(out)):
                    (out / f["path"]).unlink(missing_ok=True)
            except Exception:  # an unreadable old manifest: leave its files, replace the manifest
                pass
            (out / MANIFEST_NAME).unlink()
        shutil.rmtree(out / INTERMEDIATE_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class ExportPlan:
    """Everything read from the checkpoint before a byte is written."""

    ckpt: Checkpoint
    text: TextConfig
    vision: VisionConfig | None
    vocab: object
    special: dict
    chat_template: str
    stem: str  # file-name stem
    onnx_traced: Path | None = None  # the float ONNX graph traced from ckpt, once per export
    adapter: dict | None = None  # the LoRA merged into ckpt (export/lora.Adapter.manifest_entry)

    @classmethod
    def read(cls, src, adapter=None) -> "ExportPlan":
        """adapter: a PEFT LoRA folder merged into the weights as they are read (export/lora.py)."""
        from medgemma_edge.export.lora import merge_adapter, read_adapter
        from medgemma_edge.export.vocab import fit_vocab, read_chat_template, read_vocab, special_token_ids

        ckpt = open_checkpoint(src)
        lora = None
        if adapter is not None:
            lora = read_adapter(adapter, ckpt.architecture)
            ckpt = merge_adapter(ckpt, lora)
        text = TextConfig.from_dict(ckpt.text_config)
        check_text(text, _shapes(ckpt))
        vision = None
        if ckpt.multimodal:
            vision = VisionConfig.from_dicts(ckpt.vision_config, ckpt.config, _read_preprocessor(ckpt.path))
            check_vision(vision, _shapes(ckpt), text.hidden_size)
        vocab = fit_vocab(read_vocab(ckpt.path), text.vocab_size)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", ckpt.path.name).strip("-") or "model"
        return cls(ckpt, text, vision, vocab, special_token_ids(vocab, ckpt.multimodal),
                   read_chat_template(ckpt.path), stem, adapter=lora.manifest_entry() if lora else None)

    def write_text(self, path: Path, quant: str) -> Path:
        from medgemma_edge.export.gguf_text import write_text_gguf

        return write_text_gguf(self.ckpt, self.text, self.vocab, self.special, self.chat_template, path, quant)

    def write_vision(self, path: Path, quant: str, scratch: Path | None = None) -> Path:
        """Write one vision file. ONNX files all come from one traced float graph: the first one
        traces it into `scratch` (kept there, reused by the next; None: a temporary folder, traced
        again each call) or uses `onnx_traced` when set."""
        if quant.startswith("onnx-"):
            from medgemma_edge.export.onnx_vision import derive_vision_onnx, trace_vision_onnx, write_vision_onnx

            say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
            if scratch is None and self.onnx_traced is None:
                return write_vision_onnx(self.ckpt, path, quant, say=say)
            if self.onnx_traced is None or not self.onnx_traced.is_file():
                self.onnx_traced = trace_vision_onnx(self.ckpt, Path(scratch) / f"{self.stem}-vision-traced.onnx", say)
            return derive_vision_onnx(self.onnx_traced, path, quant, say)
        from medgemma_edge.export.gguf_vision import write_vision_gguf

        return write_vision_gguf(self.ckpt, self.vision, self.text.hidden_size, path, quant)

    def vision_name(self, quant: str) -> str:
        if quant.startswith("onnx-"):
            return f"{self.stem}-vision-{quant.removeprefix('onnx-')}.onnx"
        return f"{self.stem}-mmproj-{quant}.gguf"


def export_gguf(src, out, quant: str = DEFAULT_QUANT, vision_quant=DEFAULT_VISION_QUANTS, *,
                keep_intermediate: bool = False, quality: bool = True, threads: int = 0,
                overwrite: bool = False, adapter=None) -> ExportResult:
    """Export a local Gemma 3 / MedGemma checkpoint to a GGUF bundle in `out`.

    quant: text weights (f32/f16/bf16/q8_0 written by gguf-py, q6_k/q5_k_m/q4_k_m by llama.cpp
    from an unquantized intermediate); vision_quant: one or several of f32/f16/bf16/q8_0 (a GGUF
    mmproj for llama.cpp) and onnx-f32/onnx-int8/onnx-int8-vnni (ONNX graphs for onnxruntime, all
    made from one trace kept in the intermediate folder); the first is the
    bundle's primary vision file, and `load(vision="auto")` picks the fastest faithful one on the
    machine that runs it. Ignored for text-only models.
    quality: measure the quantized files against the unquantized export (stored in the manifest);
    "vision": the vision files only (their fidelity, which load(vision="auto") reads).
    adapter: a PEFT LoRA folder merged into the weights (recorded in the manifest); for one base
    bundle serving several adapters, see export/gguf_lora.write_lora_gguf instead.
    """
    from medgemma_edge.export import quality as q
    from medgemma_edge.export.quantize import quantize_gguf

    vision_quants = requested_vision_quants(vision_quant)
    if quant not in TEXT_QUANTS:
        raise ExportError(f"unknown --quant {quant!r}; choose one of {', '.join(TEXT_QUANTS)}")
    t0 = time.perf_counter()
    plan = ExportPlan.read(src, adapter)
    if not plan.vision:
        vision_quants = ()
    out = prepare_out(out, overwrite)
    inter = out / INTERMEDIATE_DIR
    inter.mkdir(exist_ok=True)

    ref = reference_type(plan.ckpt)
    lossy = quant not in (ref, "f32")  # else the export holds the checkpoint exactly: nothing to report
    text_path = out / f"{plan.stem}-{quant}.gguf"
    text_ref = None
    if quant in K_QUANTS or (lossy and quality):
        text_ref = plan.write_text(inter / f"{plan.stem}-{ref}.gguf", ref)
    if quant not in K_QUANTS:
        plan.write_text(text_path, quant)
    vision_paths = {vq: plan.write_vision(out / plan.vision_name(vq), vq, scratch=inter) for vq in vision_quants}
    vision_ref = None
    if quality and any(vq != "f32" for vq in vision_quants):
        vision_ref = vision_paths.get("f32") or plan.write_vision(inter / f"{plan.stem}-mmproj-f32.gguf", "f32")
    peak = {"write": peak_rss_mb()}
    if quant in K_QUANTS:
        quantize_gguf(text_ref, text_path, quant, threads)
        peak["quantize"] = peak_rss_mb()

    report = {}
    if quality and quality != "vision" and lossy:  # "vision": only the vision files' fidelity
        report["text"] = {"quant": quant, **q.compare_text(text_ref, text_path, plan.chat_template, threads, ref)}
    vision_reports = {}
    if vision_ref is not None:
        image = {"mean": plan.vision.image_mean, "std": plan.vision.image_std}  # the ONNX graph's input
        for vq, path in vision_paths.items():
            if vq != "f32":
                vision_reports[vq] = {"quant": vq, **q.compare_vision(text_path, vision_ref, path,
                                                                      plan.vision.image_size, threads, image=image)}
        report["vision"] = vision_reports.get(vision_quants[0]) or next(iter(vision_reports.values()))
        if len(vision_quants) > 1:
            report["vision_files"] = list(vision_reports.values())
    if report:
        peak["quality"] = peak_rss_mb()
    if not (keep_intermediate and any(inter.iterdir())):
        shutil.rmtree(inter)

    manifest = bundle_manifest(plan, out, quant, vision_quants, text_path, vision_paths, vision_reports, report or None)
    from medgemma_edge.export.probe import add_probe
    from medgemma_edge.runtime.manifest import write_manifest

    add_probe(out, manifest, threads)  # the self-check's reference, measured here (runtime/selfcheck.py)
    write_manifest(out, manifest)
    return ExportResult(out, manifest, time.perf_counter() - t0, peak)


def requested_vision_quants(vision_quant, default=DEFAULT_VISION_QUANTS, allowed=VISION_QUANTS,
                            refusal="unknown --vision-quant {bad!r}; choose from {allowed}") -> tuple[str, ...]:
    """The requested vision files, in order, once each; `default` when none; ExportError with
    `refusal` (formatted with the first refused name and the allowed ones) for any not in `allowed`."""
    if vision_quant is None:
        return default
    wanted = (vision_quant,) if isinstance(vision_quant, str) else tuple(vision_quant)
    bad = [v for v in wanted if v not in allowed]
    if bad or not wanted:
        raise ExportError(refusal.format(bad=bad[0] if bad else "(none)", allowed=", ".join(allowed)))
    return tuple(dict.fromkeys(wanted))


def bundle_manifest(plan: ExportPlan, out: Path, quant, vision_quants, text_path, vision_paths, vision_reports,
              quality) -> dict:
    from medgemma_edge.runtime import __version__
    from medgemma_edge.runtime.manifest import FORMAT_VERSION, file_entry
    from medgemma_edge.runtime.vision_choice import export_machine

    files = [file_entry(out, "text", text_path.name)]
    for vq in vision_quants:
        # fidelity: min cosine of image embeddings against the f32 mmproj (1.0: the f32 file itself;
        # None: not measured, an export with --no-quality)
        measured = vision_reports.get(vq, {}).get("min_cosine")
        files.append({**file_entry(out, "vision", vision_paths[vq].name), "quant": vq,
                      "fidelity": 1.0 if vq == "f32" else measured})
    v = plan.vision
    return {
        "format_version": FORMAT_VERSION,
        "backend": "gguf",
        "tool": f"medgemma-edge {__version__}",
        "source": {"path_name": plan.ckpt.path.name, "architecture": plan.ckpt.architecture,
                   "config_sha256": plan.ckpt.config_sha256()},
        "quantization": {"text": quant, "vision": vision_quants[0] if vision_quants else None},
        "files": files,
        # the quality report and the fidelity above were measured here; load(vision="auto") on another
        # machine relies on them
        "export_machine": export_machine(),
        "image": None if v is None else {"size": v.image_size, "patch_size": v.patch_size,
                                         "tokens_per_image": v.mm_tokens_per_image,
                                         "mean": v.image_mean, "std": v.image_std},
        "chat_template": plan.chat_template,
        "special_tokens": plan.special,
        "context_length": plan.text.max_position_embeddings,
        "vocab": {"tokenizer_entries": plan.vocab.tokenizer_entries, "embedding_rows": len(plan.vocab.tokens),
                  "padded": plan.vocab.padded},
        "quality": quality,
        **({"adapter": plan.adapter} if plan.adapter else {}),
    }

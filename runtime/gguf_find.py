"""Where people keep their GGUFs, and which two files are the model: a folder as LM Studio or a
community download holds it, or Ollama's local store.

- A folder (LM Studio's `models/publisher/model/…gguf`, a downloaded repository): the Gemma 3 text
  GGUFs and the projectors (`mmproj-….gguf`, general.architecture "clip") found up to three levels
  down. One model folder, one text file: that one; several quants: listed, choose with --quant;
  several projectors: f16 first (then bf16, f32, q8_0), the others named.
- `ollama:NAME[:TAG]`: the manifest `manifests/<host>/<namespace>/<model>/<tag>` under
  $OLLAMA_MODELS (else ~/.ollama/models, else the Linux service's /usr/share/ollama/.ollama/models),
  its layers by media type, each blob at `blobs/sha256-<hex>` (ollama's manifest/paths.go,
  types/model/name.go). A model layer that is a plain llama.cpp text GGUF with a projector layer
  beside it (`ollama create` from a GGUF + an mmproj) imports; gemma3 as Ollama converts and
  publishes it keeps the vision tower inside the model file (convert/convert_gemma3.go writes no
  projector; llama.cpp loads it only through Ollama's own patches, llama/compat), which is refused
  in one line saying where to get the llama.cpp pair (docs/import.md).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_edge.runtime.errors import BundleError, InputError
from medgemma_edge.runtime.gguf_meta import GGUFInfo, is_gguf, quant_from_name, read_gguf_info

MAX_DEPTH = 3
MAX_FILES = 2000
PROJECTOR_ORDER = ("f16", "bf16", "f32", "q8_0")
OLLAMA_HOST, OLLAMA_NAMESPACE, OLLAMA_TAG = "registry.ollama.ai", "library", "latest"
MODEL_LAYER = "application/vnd.ollama.image.model"
PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
MAX_OLLAMA_MANIFEST = 1 << 20
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?$")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
FUSED = ("{what} keeps the vision tower inside its model file (Ollama's own gemma3 layout), which llama.cpp "
         "cannot load — get the llama.cpp GGUF of the same model (the text .gguf and its mmproj-….gguf, e.g. from "
         "the model's GGUF repository) and import those files (docs/import.md)")


@dataclass
class Found:
    text: Path
    mmproj: Path | None
    origin: str
    notes: list[str] = field(default_factory=list)  # said to the user: what was chosen among several
    name: str | None = None  # a name for the bundle's files where the source has none (Ollama blobs)


def fused(info: GGUFInfo) -> bool:
    return any(t.startswith(("v.", "mm.")) for t in info.tensors) or "gemma3.vision.block_count" in info.metadata


def _ggufs(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        depth = len(Path(root).relative_to(folder).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
        found += [Path(root) / f for f in sorted(files) if f.lower().endswith(".gguf")]
        if len(found) > MAX_FILES:
            raise InputError(f"{folder} holds more than {MAX_FILES} GGUF files — give the model's own folder")
    return found


def _kind(info: GGUFInfo) -> str:
    if info.architecture == "clip" or info.get("general.type") == "mmproj":
        return "projector"
    if info.get("general.type") == "adapter":
        return "adapter"
    return "text" if info.architecture == "gemma3" else "other"


def find_in_folder(folder: Path, quant: str | None = None, mmproj: Path | None = None) -> Found:
    """The text GGUF (and projector) of the one model in `folder`; InputError listing the choices."""
    folder = Path(folder)
    infos = []
    for path in _ggufs(folder):
        try:
            infos.append(read_gguf_info(path, tensors=False, tokens=False))
        except BundleError:
            continue  # a damaged or foreign .gguf is not a candidate; the chosen file is checked in full
    texts = [i for i in infos if _kind(i) == "text"]
    if not texts:
        others = ", ".join(f"{i.path.name} ({str(i.architecture)[:20]})" for i in infos if _kind(i) == "other")
        raise InputError(f"no Gemma 3 text GGUF in {folder}" + (f" (found {others[:300]})" if others else "")
                         + " — give the folder a model was downloaded to, or the .gguf file itself")
    models = sorted({str(i.path.parent.relative_to(folder)) for i in texts})
    if len(models) > 1:
        raise InputError(f"{folder} holds several models ({', '.join(models)[:400]}) — give the model's own folder")
    if quant:
        chosen = [i for i in texts if quant.lower() in (i.quant, quant_from_name(i.path.name))]
        if not chosen:
            raise InputError(f"no {quant} quant in {folder} (there: {_quants(texts)}) — choose one of those")
    else:
        chosen = texts
    if len(chosen) > 1:
        raise InputError(f"{folder} holds several quants: {_quants(chosen)} — choose one with --quant")
    text = chosen[0]
    found = Found(text.path, Path(mmproj) if mmproj else None, f"folder {folder.name}")
    if mmproj is None:
        projs = [i for i in infos if _kind(i) == "projector"
                 and i.path.parent in (text.path.parent, folder)]
        projs.sort(key=lambda i: (PROJECTOR_ORDER.index(i.quant) if i.quant in PROJECTOR_ORDER else 9, i.path.name))
        if projs:
            found.mmproj = projs[0].path
            if len(projs) > 1:
                found.notes.append(f"projector: {projs[0].path.name} (also there: "
                                   f"{', '.join(p.path.name for p in projs[1:])}; choose with --mmproj)")
        else:
            found.notes.append(f"no projector (mmproj-….gguf) beside {text.path.name}: text only — add --mmproj "
                               "for images")
    return found


def _quants(infos: list[GGUFInfo]) -> str:
    return ", ".join(f"{i.quant} ({i.path.name})" for i in infos)[:500]


def ollama_models_dir() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return Path(env)
    home = Path.home() / ".ollama" / "models"
    service = Path("/usr/share/ollama/.ollama/models")
    return home if home.is_dir() or not service.is_dir() else service


def ollama_manifest_path(spec: str, models: Path) -> tuple[Path, str]:
    """(manifest path, the canonical name) for NAME[:TAG] (NAME: model, namespace/model or
    host/namespace/model)."""
    name, tag = spec, OLLAMA_TAG
    last = spec.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = spec[: len(spec) - len(last)] + last.split(":", 1)[0], last.split(":", 1)[1]
    parts = name.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_HOST, OLLAMA_NAMESPACE] + parts
    elif len(parts) == 2:
        parts = [OLLAMA_HOST] + parts
    if len(parts) != 3 or not _HOST.match(parts[0]) or not all(_PART.match(p) for p in parts[1:] + [tag]) \
            or any(p in (".", "..") for p in parts + [tag]):
        raise InputError(f"ollama:{spec[:80]} is not an Ollama model name — give ollama:NAME or ollama:NAME:TAG "
                         "as `ollama list` shows it")
    return models.joinpath("manifests", *parts, tag), f"{name}:{tag}"


def find_ollama(spec: str, models: Path | None = None) -> Found:
    """The text GGUF and projector of an Ollama model in the local store."""
    models = Path(models) if models is not None else ollama_models_dir()
    path, name = ollama_manifest_path(spec, models)
    what = f"ollama:{name}"
    if not path.is_file():
        raise InputError(f"{what} is not in Ollama's store at {models} — check `ollama list`, or set OLLAMA_MODELS "
                         "to the folder Ollama keeps models in")
    try:
        if path.stat().st_size > MAX_OLLAMA_MANIFEST:
            raise ValueError("too large")
        layers = json.loads(path.read_text(encoding="utf-8")).get("layers")
        if not isinstance(layers, list):
            raise ValueError("no layers")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        raise BundleError(f"the Ollama manifest of {what} is not readable JSON with layers — pull the model again") \
            from None

    def blob(media: str) -> Path | None:
        for layer in layers:
            if isinstance(layer, dict) and layer.get("mediaType") == media:
                m = _DIGEST.match(str(layer.get("digest", "")))
                if not m:
                    raise BundleError(f"the Ollama manifest of {what} has a layer without a sha256 digest — pull "
                                      "the model again")
                p = models / "blobs" / f"sha256-{m.group(1)}"
                if not p.is_file():
                    raise BundleError(f"{what}'s {media.rsplit('.', 1)[-1]} blob {p.name[:19]}… is missing from "
                                      f"{models / 'blobs'} — pull the model again")
                return p
        return None

    model = blob(MODEL_LAYER)
    if model is None or not is_gguf(model):
        raise InputError(f"{what} has no GGUF model layer (Ollama stores some models in other formats) — import a "
                         "llama.cpp GGUF of the model instead")
    info = read_gguf_info(model, tokens=False)
    if info.architecture == "gemma3" and fused(info):
        raise BundleError(FUSED.format(what=what))
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace(":", "-"))
    return Found(model, blob(PROJECTOR_LAYER), what, name=safe)

"""manifest.json: the contract between an exported bundle and the runtime.

Shape (format_version 1):
    {"format_version": 1, "backend": "gguf" | "onnx", "tool": "medgemma-edge 0.1.0",
     "source": {"path_name", "architecture", "config_sha256"},
     "quantization": {"text": "q4_k_m", "vision": "f16" | null},
     "files": [{"role": "text" | "vision", "path", "size", "sha256"[, vision: "quant", "fidelity"]}],
     "export_machine": {"cpu_kind", "cpu_flags"} (optional),
     "image": {"size", "patch_size", "tokens_per_image", "mean", "std"} | null,
     "chat_template", "special_tokens": {...}, "context_length",
     "vocab": {"tokenizer_entries", "embedding_rows", "padded"}, "quality": {...} | null}
`vocab`: the GGUF's token list has `embedding_rows` entries; padded means placeholders were added
after the tokenizer's entries; tokenizer_entries > embedding_rows means added tokens the model has
no row for were left out.
A vision file names its encoding (`quant`: f16, onnx-int8, …) and the export's measured `fidelity`
(min cosine of its image embeddings against the f32 tower; None: not measured). That was measured
on the exporting machine, whose CPU kind and SIMD flags `export_machine` records
(runtime/vision_choice.export_machine; absent in bundles exported before it was written).
An ONNX bundle (backend "onnx") also lists its decoder's external weights ("text_data"), the
embedding table ("embeddings") and the vocabulary-only GGUF ("tokenizer"), and describes the
decoder graph under "decoder" (export/onnx_decoder.py). Every listed file is hashed by verify.
"selfcheck" (optional): {"path", "size", "sha256"} of the probe the export measured
(runtime/selfcheck.py); hashed by verify like the files, but kept out of "files" so that runtimes
older than it, which refuse unknown roles there, still load the bundle.
No torch here: the runtime reads it on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from medgemma_edge.runtime.cache import read_record, write_record
from medgemma_edge.runtime.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("format_version", "backend", "tool", "source", "quantization", "files", "image",
                 "chat_template", "special_tokens", "context_length", "vocab", "quality")
# The file roles each backend's bundle may list (text: the decoder itself, once; the rest: any number).
ROLES = {"gguf": ("text", "vision"),
         "onnx": ("text", "text_data", "embeddings", "tokenizer", "vision")}
ONE_OF = {"gguf": ("text",), "onnx": ("text", "tokenizer")}
HASH_BLOCK = 8 << 20
MAX_MANIFEST_BYTES = 16 << 20  # a manifest with its chat template and quality report is a few KB


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def file_entry(bundle_dir: Path, role: str, path: str) -> dict:
    """The manifest record of one bundle file: role, relative path, size and sha256."""
    full = Path(bundle_dir) / path
    return {"role": role, "path": path, "size": full.stat().st_size, "sha256": sha256_file(full)}


def write_manifest(bundle_dir: Path, manifest: dict) -> Path:
    """Validate and write manifest.json atomically (a reader never sees half a manifest)."""
    _check_shape(manifest, Path(bundle_dir).name)
    out = Path(bundle_dir) / MANIFEST_NAME
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def read_manifest(bundle_dir) -> dict:
    """The bundle's manifest, checked for shape and version; BundleError with one line otherwise."""
    bundle = Path(bundle_dir)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a folder — point at a bundle made by `medgemma-edge export`")
    if not path.is_file():
        raise BundleError(f"no {MANIFEST_NAME} in {bundle} — is this a bundle? make one with `medgemma-edge export`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST_NAME} in {bundle.name} is {path.stat().st_size} bytes, no manifest is "
                          "that large — export the bundle again")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{MANIFEST_NAME} in {bundle.name} is not valid JSON ({err}) "
                          "— export the bundle again") from None
    except RecursionError:
        raise BundleError(f"{MANIFEST_NAME} in {bundle.name} is nested too deeply to be a manifest "
                          "— export the bundle again") from None
    _check_shape(manifest, bundle.name)
    return manifest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optional(check):
    return lambda v: v is None or check(v)


def _image_ok(v) -> bool:
    if not isinstance(v, dict):
        return False
    triple = lambda x: isinstance(x, list) and len(x) == 3 and all(_is_number(t) for t in x)
    return (all(_is_int(v.get(k)) and 0 < v[k] <= 8192 for k in ("size", "tokens_per_image"))
            and all(k not in v or triple(v[k]) for k in ("mean", "std")))


def _file_ok(f) -> bool:
    return (isinstance(f, dict) and isinstance(f.get("role"), str) and isinstance(f.get("path"), str)
            and _is_int(f.get("size")) and f["size"] >= 0 and isinstance(f.get("sha256"), str)
            and len(f["sha256"]) == 64 and isinstance(f.get("quant", ""), str)
            and (f.get("fidelity") is None or _is_number(f["fidelity"])))


def _decoder_ok(v) -> bool:
    """The ONNX decoder description the runtime's engine reads (export/onnx_decoder.describe_decoder)."""
    return (isinstance(v, dict) and isinstance(v.get("file"), str)
            and all(_is_int(v.get(k)) and v[k] > 0 for k in ("layers", "kv_heads", "head_dim", "hidden", "vocab"))
            and isinstance(v.get("attention_bias", {}), dict))


# The fields the runtime reads, and what each must be (everything else is kept, not read).
SCHEMA = {
    "backend": lambda v: isinstance(v, str),
    "files": lambda v: isinstance(v, list) and 0 < len(v) <= 16 and all(_file_ok(f) for f in v),
    "image": _optional(_image_ok),
    "special_tokens": lambda v: isinstance(v, dict) and all(isinstance(k, str) and (v[k] is None or _is_int(v[k]))
                                                            for k in v),
    "chat_template": _optional(lambda v: isinstance(v, str)),
    "context_length": _optional(_is_int),
    "demo_notice": _optional(lambda v: isinstance(v, str)),
    "decoder": _optional(lambda v: _decoder_ok(v)),
    "export_machine": _optional(lambda v: isinstance(v, dict) and isinstance(v.get("cpu_kind"), str)
                                and isinstance(v.get("cpu_flags"), list)
                                and all(isinstance(x, str) for x in v["cpu_flags"])),
    "selfcheck": _optional(lambda v: isinstance(v, dict) and _file_ok({**v, "role": "selfcheck"})),
    "embeddings": _optional(lambda v: isinstance(v, dict) and isinstance(v.get("files"), list)
                            and all(isinstance(f, str) for f in v["files"]) and isinstance(v.get("dtype"), str)),
}


def check_manifest(manifest, name: str, *, in_memory: bool = False) -> None:
    """The shape checks of read_manifest, for a manifest built in memory (runtime/gguf_check.py):
    there, files are listed by absolute path (they stay where the user keeps them)."""
    _check_shape(manifest, name, in_memory=in_memory)


def _check_shape(manifest, name: str, in_memory: bool = False) -> None:
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST_NAME} in {name} is not a JSON object — export the bundle again")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        hint = "upgrade medgemma-edge" if _is_int(version) and version > FORMAT_VERSION \
            else "export the bundle again"
        shown = version if _is_int(version) or version is None else type(version).__name__
        raise BundleError(f"bundle {name} has manifest format {shown!r}, this runtime reads "
                          f"{FORMAT_VERSION} — {hint}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{MANIFEST_NAME} in {name} lacks {', '.join(missing)} — export the bundle again")
    wrong = [k for k, ok in SCHEMA.items() if k in manifest and not ok(manifest[k])]
    if wrong:
        raise BundleError(f"{MANIFEST_NAME} in {name} has a malformed {', '.join(wrong)} field — export the "
                          "bundle again")
    backend = manifest["backend"]
    allowed = ROLES.get(backend) or tuple(dict.fromkeys(r for rs in ROLES.values() for r in rs))
    roles = []
    for f in manifest["files"]:
        p = PurePosixPath(f["path"])
        if (p.is_absolute() and not in_memory) or ".." in p.parts or not f["path"] or f["role"] not in allowed or "\x00" in f["path"]:
            raise BundleError(f"{MANIFEST_NAME} in {name} names {f['path']!r} as {f['role']!r}; only "
                              f"{'/'.join(allowed)} files inside the bundle are allowed — export the bundle again")
        if f["role"] == "vision" and not f.get("quant"):  # runtime/vision_choice chooses by it
            raise BundleError(f"{MANIFEST_NAME} in {name} does not name the encoding (quant) of vision file "
                              f"{f['path']!r} — export the bundle again")
        roles.append(f["role"])
    for role in ONE_OF.get(backend, ("text",)):
        if roles.count(role) != 1:
            raise BundleError(f"{MANIFEST_NAME} in {name} must list one {role} file — export the bundle again")
    if backend == "onnx" and not (manifest.get("decoder") and manifest.get("embeddings")):
        raise BundleError(f"{MANIFEST_NAME} in {name} is an ONNX bundle without its decoder description "
                          "— export the bundle again")
    probe = manifest.get("selfcheck")
    if probe and (probe["path"] in ("", ".", "..") or any(c in probe["path"] for c in "/\\\x00")):
        raise BundleError(f"{MANIFEST_NAME} in {name} names {probe['path']!r} as its selfcheck probe; only a file "
                          "inside the bundle is allowed — export the bundle again")
    paths = [f["path"] for f in listed_files(manifest)]
    if len(set(paths)) != len(paths):
        raise BundleError(f"{MANIFEST_NAME} in {name} lists a file twice — export the bundle again")


def listed_files(manifest: dict) -> list[dict]:
    """Every file the manifest pins by size and sha256: "files", and the self-check probe if any."""
    return manifest["files"] + ([manifest["selfcheck"]] if manifest.get("selfcheck") else [])


def verify_bundle(bundle_dir, *, hashes: bool = True, remember: Path | None = None) -> dict:
    """Check every file against the manifest (presence, size and, with hashes, sha256); returns the
    manifest. With `remember` (a JSON file), a file whose size, mtime and inode are those of an
    earlier successful check is not hashed again: the first load of a bundle pays the hash, every
    later one is instant, and a file changed since (copied again, edited) is hashed anew."""
    bundle = Path(bundle_dir)
    return verify_files(bundle, read_manifest(bundle), hashes=hashes, remember=remember)


def _stamp_key(path: Path) -> tuple[str, list]:
    st = path.stat()
    return str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]


def remembered_sha256(path: Path, remember: Path | None) -> str:
    """sha256 of a file, taken from `remember` where an earlier hash of this very file (same size,
    mtime, inode) is recorded, else computed and recorded there."""
    path = Path(path)
    key, stamp = _stamp_key(path)
    known = read_record(remember) if remember else {}
    if isinstance(known.get(key), list) and known[key][:3] == stamp and len(known[key]) == 4:
        return known[key][3]
    digest = sha256_file(path)
    if remember:
        write_record(remember, {**known, key: stamp + [digest]})
    return digest


def verify_files(bundle: Path, manifest: dict, *, hashes: bool = True, remember: Path | None = None) -> dict:
    """verify_bundle for a manifest already read (files listed relative to `bundle`, or absolute)."""
    known = read_record(remember) if remember else {}
    verified = {}
    for f in listed_files(manifest):
        path = bundle / f["path"]
        if not path.is_file():
            raise BundleError(f"bundle file {f['path']} is missing — copy the whole bundle folder again")
        key, stamp = _stamp_key(path)
        if stamp[0] != f["size"]:
            raise BundleError(f"bundle file {f['path']} has {stamp[0]} bytes, the manifest says {f['size']} "
                              "— the copy is incomplete; copy it again")
        stamp = stamp + [f["sha256"]]
        if not hashes or known.get(key) == stamp:
            continue
        if sha256_file(path) != f["sha256"]:
            raise BundleError(f"bundle file {f['path']} does not match its sha256 in the manifest "
                              "— the file is corrupt; copy or export it again")
        verified[key] = stamp
    if remember and verified:
        write_record(remember, {**known, **verified})  # unwritable: the next load hashes again
    return manifest

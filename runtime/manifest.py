"""manifest.json: the contract between an exported bundle and the runtime.

Shape (format_version 1):
    {"format_version": 1, "backend": "gguf", "tool": "medgemma-edge 0.1.0",
     "source": {"path_name", "architecture", "config_sha256"},
     "quantization": {"text": "q4_k_m", "vision": "f16" | null},
     "files": [{"role": "text" | "vision", "path", "size", "sha256"}],
     "image": {"size", "patch_size", "tokens_per_image", "mean", "std"} | null,
     "chat_template", "special_tokens": {...}, "context_length",
     "vocab": {"tokenizer_entries", "embedding_rows", "padded"}, "quality": {...} | null}
`vocab`: the GGUF's token list has `embedding_rows` entries; padded means placeholders were added
after the tokenizer's entries; tokenizer_entries > embedding_rows means added tokens the model has
no row for were left out.
No torch here: the runtime reads it on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from runtime.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("format_version", "backend", "tool", "source", "quantization", "files", "image",
                 "chat_template", "special_tokens", "context_length", "vocab", "quality")
ROLES = ("text", "vision")
HASH_BLOCK = 8 << 20


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
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{MANIFEST_NAME} in {bundle.name} is not valid JSON ({err}) "
                          "— export the bundle again") from None
    _check_shape(manifest, bundle.name)
    return manifest


def _check_shape(manifest, name: str) -> None:
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST_NAME} in {name} is not a JSON object — export the bundle again")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        hint = "upgrade medgemma-edge" if isinstance(version, int) and version > FORMAT_VERSION \
            else "export the bundle again"
        raise BundleError(f"bundle {name} has manifest format {version!r}, this runtime reads "
                          f"{FORMAT_VERSION} — {hint}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{MANIFEST_NAME} in {name} lacks {', '.join(missing)} — export the bundle again")
    files = manifest["files"]
    if not isinstance(files, list) or not files:
        raise BundleError(f"{MANIFEST_NAME} in {name} lists no files — export the bundle again")
    roles = []
    for f in files:
        if not isinstance(f, dict) or not {"role", "path", "size", "sha256"} <= set(f):
            raise BundleError(f"{MANIFEST_NAME} in {name} has a malformed file entry — export the bundle again")
        p = PurePosixPath(f["path"])
        if p.is_absolute() or ".." in p.parts or f["role"] not in ROLES:
            raise BundleError(f"{MANIFEST_NAME} in {name} names {f['path']!r} as {f['role']!r}; only "
                              "text/vision files inside the bundle are allowed — export the bundle again")
        roles.append(f["role"])
    if "text" not in roles or len(set(roles)) != len(roles):
        raise BundleError(f"{MANIFEST_NAME} in {name} must list one text file and at most one vision file "
                          "— export the bundle again")


def verify_bundle(bundle_dir) -> dict:
    """Check every file against the manifest (presence, size, sha256); returns the manifest."""
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    for f in manifest["files"]:
        path = bundle / f["path"]
        if not path.is_file():
            raise BundleError(f"bundle file {f['path']} is missing — copy the whole bundle folder again")
        size = path.stat().st_size
        if size != f["size"]:
            raise BundleError(f"bundle file {f['path']} has {size} bytes, the manifest says {f['size']} "
                              "— the copy is incomplete; copy it again")
        if sha256_file(path) != f["sha256"]:
            raise BundleError(f"bundle file {f['path']} does not match its sha256 in the manifest "
                              "— the file is corrupt; copy or export it again")
    return manifest

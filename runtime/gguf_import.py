"""`medgemma-edge import` and a `.gguf` given where a bundle goes: the GGUFs people already have.

import_gguf(SOURCE, OUT): SOURCE is a text .gguf (with `mmproj`), a folder (runtime/gguf_find.py)
or `ollama:NAME[:TAG]`; OUT becomes a bundle whose files are hard links to the user's files (never
moved, never rewritten, never a symlink: the image cache's rules refuse those), or copies with
`copy=True` where a link cannot be made (another file system). Its manifest is runtime/gguf_check's.

open_model_files(PATH, mmproj): what `load()` reads — a bundle folder's manifest, or for a .gguf
(or ollama:NAME) the same manifest built in memory, the files listed where they are.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_edge.runtime.errors import BundleError, InputError
from medgemma_edge.runtime.gguf_check import gguf_manifest
from medgemma_edge.runtime.gguf_find import Found, find_in_folder, find_ollama
from medgemma_edge.runtime.manifest import check_manifest, remembered_sha256, verify_bundle, write_manifest

OLLAMA = "ollama:"
COPY_BLOCK = 16 << 20
UNHASHED = "0" * 64  # a placeholder where only the checks are wanted (serve's check before its port opens)


@dataclass
class Imported:
    bundle: Path
    manifest: dict
    linked: bool
    notes: list[str] = field(default_factory=list)


def find_source(source, mmproj=None, quant: str | None = None) -> Found:
    """The files SOURCE names: a .gguf, a folder of GGUFs, or ollama:NAME[:TAG]."""
    text = str(source)
    if text.startswith(OLLAMA):
        if quant:
            raise InputError("--quant chooses among the files of a folder; an Ollama tag names one quant already")
        found = find_ollama(text[len(OLLAMA):])
        if mmproj is not None:
            found.mmproj = Path(mmproj)
        return found
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path} does not exist — give a .gguf file, a folder holding one, or ollama:NAME")
    if path.is_dir():
        return find_in_folder(path, quant, mmproj)
    if quant:
        raise InputError("--quant chooses among the files of a folder; a .gguf file is one quant already")
    return Found(path, Path(mmproj) if mmproj is not None else None, "GGUF file")


def _names(found: Found) -> tuple[str, str | None]:
    if found.name:  # Ollama blobs are named by hash
        return f"{found.name}.gguf", (f"mmproj-{found.name}.gguf" if found.mmproj else None)
    text = found.text.name
    mm = found.mmproj.name if found.mmproj else None
    if mm == text:
        mm = f"mmproj-{mm}"
    return text, mm


def _place(src: Path, dst: Path, copy: bool, progress) -> bool:
    """Hard-link src at dst (True), or copy it with copy=True (False)."""
    try:
        os.link(src, dst)
        return True
    except OSError as err:
        if not copy:
            size = src.stat().st_size / 1e6
            raise BundleError(f"cannot hard-link {src.name} into {dst.parent} ({err.strerror or err}: another file "
                              f"system?) — add --copy to copy its {size:,.0f} MB, or choose a folder on the same "
                              "disk") from None
    tmp = dst.with_name(dst.name + ".partial")
    total, done = src.stat().st_size, 0
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while block := fin.read(COPY_BLOCK):
            fout.write(block)
            done += len(block)
            if progress:
                progress(f"copying {src.name}: {done / 1e6:,.0f} of {total / 1e6:,.0f} MB")
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    return False


def import_gguf(source, out, *, mmproj=None, quant: str | None = None, copy: bool = False, remember=None,
                progress=None) -> Imported:
    """Write bundle OUT for SOURCE's GGUFs; every check runs before anything is written."""
    found = find_source(source, mmproj, quant)
    out = Path(out)
    manifest = gguf_manifest(found.text, found.mmproj, origin=found.origin, sha256=lambda p: UNHASHED)  # checks
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder — choose a new folder for the bundle")
    names = _names(found)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    placed = []
    try:
        linked = True
        for src, name in zip((found.text, found.mmproj), names):
            if src is not None:
                linked &= _place(src, out / name, copy, progress)
                placed.append(out / name)
        if progress:
            progress("hashing the files for the manifest")
        for entry, name in zip(manifest["files"], names):  # text first, then the projector, as placed
            entry["path"], entry["sha256"] = name, remembered_sha256(out / name, remember)
        manifest["source"]["path_name"] = names[0]
        write_manifest(out, manifest)
    except BaseException:
        for p in placed:
            p.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return Imported(out, manifest, linked, found.notes)


def open_model_files(path, mmproj=None, *, hashes: bool = True, remember=None) -> tuple[Path, dict]:
    """(folder the manifest's relative paths start from, manifest) for a bundle folder, a .gguf
    file or ollama:NAME[:TAG], every file checked (with hashes, its sha256: remembered by size,
    mtime and inode, so a file is hashed once)."""
    text = str(path)
    p = Path(path)
    if not text.startswith(OLLAMA) and p.is_dir():
        if mmproj is not None:
            raise InputError(f"--mmproj goes with a .gguf file; {p.name} is a bundle folder, which lists its own "
                             "vision files")
        return p, verify_bundle(p, hashes=hashes, remember=remember)
    if not text.startswith(OLLAMA) and not p.exists():
        if p.suffix.lower() == ".gguf":
            raise InputError(f"{p} does not exist — give the path of a downloaded .gguf file")
        return p, verify_bundle(p, hashes=hashes, remember=remember)  # says what is missing, as for any bundle
    found = find_source(path, mmproj)
    sha = (lambda f: remembered_sha256(f, remember)) if hashes else (lambda f: UNHASHED)
    manifest = gguf_manifest(found.text, found.mmproj, origin=found.origin, sha256=sha)
    check_manifest(manifest, found.text.name, in_memory=True)
    return found.text.parent, manifest

"""llama.cpp's own converter, for the tests that import GGUFs people make with it.

`converter()` fetches the llama-cpp-python source distribution of the installed version with
`pip download` (PyPI, once per cache) and keeps its `vendor/llama.cpp/convert_hf_to_gguf.py` with
the `conversion/` package and `gguf-py` beside it. `converted_pair()` runs it on a checkpoint,
text and `--mmproj`, as a user following llama.cpp's instructions would.

`pattern6_checkpoint()`: the tiny reference checkpoint with Gemma 3's standard layer rhythm (every
6th layer global). The tiny model shortens that rhythm to 3 (testing/models.TINY_TEXT); llama.cpp's
converter writes no sliding-window pattern for Gemma 3 (llama.cpp then assumes every 6th layer),
which holds for every published Gemma 3 and MedGemma but not for the shortened tiny one. Same
weights, same tokenizer; only config.json differs (and names the architecture, as published
checkpoints do).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from medgemma_edge.runtime.cache import cache_root
from medgemma_edge.testing.models import build_tiny

PACKAGE = "llama-cpp-python"
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter() -> Path:
    """The folder holding convert_hf_to_gguf.py (+ conversion/, gguf-py/) of the installed llama-cpp-python."""
    ver = version(PACKAGE)
    out = cache_root() / "llamacpp-converter" / ver
    if (out / ".done").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"{PACKAGE}=={ver}", "-d", tmp], check=True, timeout=900)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        part = out.with_name(ver + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/vendor/llama.cpp/", 1)
                if len(rel) == 2 and rel[1].startswith(KEEP) and (member.isfile() or member.isdir()):
                    member.name = rel[1]
                    tar.extract(member, part, filter="data")
        if not (part / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        (part / ".done").write_text(ver)
        shutil.rmtree(out, ignore_errors=True)
        part.rename(out)
    return out


def pattern6_checkpoint() -> Path:
    """The tiny checkpoint with every 6th layer global (see the module's docstring), cached."""
    tiny = build_tiny()
    out = cache_root() / "testmodels" / "tiny-pattern6"
    stamp = (tiny / ".stamp").read_text()
    if (out / ".stamp").is_file() and (out / ".stamp").read_text() == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in tiny.iterdir():
        if f.is_file() and f.name not in ("config.json", ".stamp"):
            os.link(f, out / f.name) if f.stat().st_dev == out.stat().st_dev else shutil.copy2(f, out / f.name)
    config = json.loads((tiny / "config.json").read_text())
    config["architectures"] = ["Gemma3ForConditionalGeneration"]
    n = config["text_config"]["num_hidden_layers"]
    config["text_config"]["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                            for i in range(n)]
    config["text_config"]["_sliding_window_pattern"] = 6
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / ".stamp").write_text(stamp)
    return out


def convert(checkpoint: Path, out: Path, *, mmproj: bool, outtype: str = "f32") -> Path:
    """Run llama.cpp's converter on `checkpoint` into `out` (a .gguf path)."""
    conv = converter()
    env = {**os.environ, "PYTHONPATH": str(conv / "gguf-py"), "NO_LOCAL_GGUF": ""}
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(checkpoint), "--outfile", str(out),
           "--outtype", outtype] + (["--mmproj"] if mmproj else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}): {done.stderr[-2000:]}")
    return out


def converted_pair() -> tuple[Path, Path]:
    """(text GGUF, mmproj GGUF) of pattern6_checkpoint() as llama.cpp's converter writes them, cached."""
    ckpt = pattern6_checkpoint()
    out = cache_root() / "llamacpp-converted" / version(PACKAGE)
    text, proj = out / "tiny-F32.gguf", out / "mmproj-tiny-F32.gguf"
    stamp = f"{(ckpt / '.stamp').read_text()} llama-cpp-python={version(PACKAGE)}"
    if (out / ".stamp").is_file() and (out / ".stamp").read_text() == stamp:
        return text, proj
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    convert(ckpt, text, mmproj=False)
    convert(ckpt, proj, mmproj=True)
    (out / ".stamp").write_text(stamp)
    return text, proj

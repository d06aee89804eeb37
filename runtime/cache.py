"""Where generated things live (reference models, the demo bundle, small records the runtime keeps:
bundle files already hashed, encode speeds). Never inside the repository."""

import json
import os
from pathlib import Path


def cache_root() -> Path:
    root = Path(os.environ.get("MEDGEMMA_EDGE_CACHE", Path.home() / ".cache" / "medgemma-edge"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def read_record(path: Path | None) -> dict:
    """A small JSON object the runtime keeps in the cache folder; {} when absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_record(path: Path, data: dict) -> bool:
    """Replace such a record atomically, best effort: what cannot be written is measured again.
    False when it could not be written."""
    try:
        tmp = Path(f"{path}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
        return True
    except OSError:
        return False

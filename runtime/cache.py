"""Where generated things live: reference models, the demo bundle. Never inside the repository."""

import os
from pathlib import Path


def cache_root() -> Path:
    root = Path(os.environ.get("MEDGEMMA_EDGE_CACHE", Path.home() / ".cache" / "medgemma-edge"))
    root.mkdir(parents=True, exist_ok=True)
    return root

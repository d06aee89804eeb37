"""Results without the measuring machine's folders: what results.json and onnx_text.json keep is
the same wherever the run happened.

Every absolute path, whether a whole value or a word inside text (an error message, the command
line), becomes its path relative to the cache root (runtime.cache.cache_root():
"bench/bundles/medgemma-4b-shaped-q4_k_m-default") when it lies there, else its file name (a
temporary folder's image cache: "image-cache").
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

# An absolute path inside text: a "/" that starts a word (not the one in "tok/s" or "1/7"), then
# anything up to white space or a quote.
ABSOLUTE = re.compile(r"(?<![\w./~-])/[^\s'\"`()]+")


def relative(path: str, root: Path) -> str:
    """One absolute path: relative to `root` when under it, else its name."""
    p, r = PurePosixPath(path), PurePosixPath(str(root))
    try:
        return str(p.relative_to(r))
    except ValueError:
        return p.name


def portable(obj, root: Path | None = None):
    """`obj` (json-like) with every absolute path made relative to `root` (default: the cache
    root) or cut to its name."""
    if root is None:
        from medgemma_edge.runtime.cache import cache_root

        root = cache_root()
    if isinstance(obj, dict):
        return {k: portable(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, root) for v in obj]
    if isinstance(obj, str):
        return ABSOLUTE.sub(lambda m: relative(m[0], root), obj)
    return obj

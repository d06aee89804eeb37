"""Every file the runtime reads is opened here: regular files only, of bounded size, named
safely in messages.

Why one gate: `open()` on a FIFO blocks until a writer appears, a `.dcm` link to /dev/zero reads
zeros forever, /dev/urandom grows memory without bound, and opening some devices has side
effects. So the path is stat()ed before it is opened (anything but a regular file is refused
unopened), then opened with O_NONBLOCK (a FIFO swapped in after the stat cannot block the
open) and fstat()ed again, so what is read is what was checked. Pictures, DICOM files and the
members of a series folder all come through `open_regular`.

Paths are quoted through `shown`, which escapes control characters: a file name in a series
folder can hold a newline (splitting a one-line error) or a terminal escape sequence.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import unicodedata
from typing import BinaryIO, Iterator

from medgemma_edge.runtime.errors import InputError

# No picture or DICOM file a clinic sends is near this; a larger one is a damaged or hostile
# file (a sparse file can claim terabytes) and would be read whole into memory.
MAX_FILE_BYTES = 2 << 30

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
          | getattr(os, "O_BINARY", 0))
# Categories escaped by `shown`: controls, format characters (bidi overrides can reorder what a
# terminal shows), line/paragraph separators, and the surrogates os.fsdecode makes of bytes
# that are not UTF-8.
_ESCAPED = {"Cc", "Cf", "Zl", "Zp", "Cs"}


class NotAFile(InputError):
    """The path names no regular file (a FIFO, a device, a folder, nothing). `reason` is the
    short why, for the one-line note a series folder prints when it skips such an entry."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def shown(path) -> str:
    """The path as messages print it: characters a terminal would act on are escaped the way
    repr() writes them, so a name stays one visible line and means what it shows."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    if os.sep == "/":
        text = text.replace("\\", "\\\\")  # a literal backslash stays distinct from an escape
    return "".join(_escape(c) if unicodedata.category(c) in _ESCAPED else c for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if c in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


@contextlib.contextmanager
def open_regular(path, *, limit: int = MAX_FILE_BYTES) -> Iterator[tuple[BinaryIO, int]]:
    """(binary file, size) of the regular file at `path`, or a one-line InputError."""
    name = shown(path)
    if os.fspath(path) == "-":
        raise InputError("-: reading from standard input is not supported — save the picture "
                         "to a file and pass its path (from Python, pass its bytes)")
    try:
        _check(os.stat(path), name, limit)  # before open: opening a device can act on it
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        reason = "a dangling link" if os.path.islink(path) else "gone while reading"
        raise NotAFile(f"{name}: no such file — check the path", reason) from None
    except OSError as err:
        raise InputError(f"{name}: cannot open it ({err.strerror or type(err).__name__}) — "
                         f"check the path and its permissions") from None
    try:
        size = _check(os.fstat(fd), name, limit)  # the path may have changed since the stat
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh, size


def read_bytes(path, *, limit: int = MAX_FILE_BYTES) -> bytes:
    """The whole regular file at `path` (see `open_regular`)."""
    with open_regular(path, limit=limit) as (fh, _):
        try:
            data = fh.read(limit + 1)  # +1: a file that grew past the limit since the fstat
        except OSError as err:
            raise InputError(f"{shown(path)}: cannot read it ({err.strerror or err}) — check "
                             f"the file and the disk") from None
    if len(data) > limit:
        raise InputError(_too_big(shown(path), len(data), limit))
    return data


def read_head(path, count: int) -> bytes:
    """The first `count` bytes of the regular file at `path`: enough to tell what it holds."""
    with open_regular(path) as (fh, _):
        try:
            return fh.read(count)
        except OSError as err:
            raise InputError(f"{shown(path)}: cannot read it ({err.strerror or err}) — check "
                             f"the file and the disk") from None


def note(text: str) -> None:
    """One line on stderr about something skipped, for a person watching the run."""
    sys.stderr.write(f"note: {text}\n")


def _check(st: os.stat_result, name: str, limit: int) -> int:
    if stat.S_ISDIR(st.st_mode):
        raise NotAFile(f"{name}: is a folder — pass one file (load_pictures reads a folder as "
                       f"a DICOM series)", "a folder")
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "a special file")
        raise NotAFile(f"{name}: is {kind}, not a regular file — copy the picture or DICOM "
                       f"file to disk and pass that", f"{kind}, not a regular file")
    if st.st_size > limit:
        raise InputError(_too_big(name, st.st_size, limit))
    return st.st_size


def _too_big(name: str, size: int, limit: int) -> str:
    return (f"{name}: {size:,} bytes is over the {limit:,}-byte limit for one file — pass a "
            f"smaller export (one series per folder, fewer frames per file)")


def file_id(path) -> str:
    """A stand-in identity for a file whose manifest has no hash: name, size, mtime."""
    import hashlib

    st = os.stat(path)
    name = os.path.basename(os.fspath(path))
    return hashlib.sha256(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()

"""`ask`'s progress before the first token (runtime/progress.py) on stderr: a tqdm bar per stage when
stderr is a terminal, else one plain line per image encoded of a series (a log stays readable)."""

from __future__ import annotations

import io
import os
import sys

import click

BARS = {"images": ("encoding images", "image"), "prompt": ("reading the prompt", "token")}


class ProgressLines:
    """show(progress) for each Progress item, close() once the answer starts (or fails)."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar, self.stage = None, None

    def show(self, p) -> None:
        if not self.tty:
            if p.stage == "images" and p.done and p.total > 1:  # the lines `ask` always printed
                click.echo(f"encoded {p.done}/{p.total} images ({p.elapsed_s:.0f} s)", file=self.stream)
            return
        if p.stage != self.stage:
            from tqdm import tqdm

            self.close()
            desc, unit = BARS.get(p.stage, (p.stage, "it"))
            # every event drawn (mininterval 0): they come seconds apart on a CPU, one per image or block.
            # A terminal that says it is 0 by 0 (a pty nobody sized) would hide the bar: 80 by 24 then.
            width, height = _size(self.stream)
            self.bar, self.stage = tqdm(total=p.total, desc=desc, unit=unit, file=self.stream, leave=False,
                                        dynamic_ncols=bool(width), ncols=None if width else 80,
                                        nrows=None if height else 24, mininterval=0, miniters=1), p.stage
        # before tqdm has a rate of its own: the time left at this machine's remembered encode speed
        early = p.done == 0 and p.eta_s is not None
        self.bar.set_postfix_str(f"about {p.eta_s:.0f} s left" if early else "", refresh=early)
        self.bar.update(p.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None


def _size(stream) -> tuple[int, int]:
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0, 0

"""Drawing Ollama's NDJSON progress (``status``, ``digest``, ``total``,
``completed``) of a pull or a create: on a terminal a bar per file (tqdm)
and the other statuses as lines; elsewhere (a pipe, a log) one plain line
per status, so a log reads ``pulling manifest``, ``pulling 8eeb52dfb3bb``,
..., ``success``.  Written to stderr as Ollama does, so that ``run``'s
answer on stdout stays clean."""

from __future__ import annotations

import contextlib
import os
from typing import Any, BinaryIO, Iterator, TextIO

from tqdm import tqdm

_BAR = "{desc}: {percentage:3.0f}% |{bar}| {n_fmt}B/{total_fmt}B {rate_fmt} {remaining}"


def _label(obj: dict[str, Any]) -> str:
    """A file's line: its status, or "pulling <first 12 hex of the digest>" (Ollama's bar label)."""
    status = str(obj.get("status") or "").strip()
    if status:
        return status
    digest = str(obj.get("digest") or "")
    return f"pulling {digest.removeprefix('sha256:')[:12]}"


class Progress:
    """One pull's or create's progress on ``out``; ``bars`` on a terminal."""

    def __init__(self, out: TextIO, bars: bool) -> None:
        self.out = out
        self.bars = bars
        self._bars: dict[str, tqdm] = {}  # the files still going
        self._seen: set[str] = set()  # every file met (a finished one's bar stays drawn, closed)
        self._last = ""

    @classmethod
    def on(cls, out: TextIO) -> "Progress":
        """Bars on a terminal that has a width, lines elsewhere."""
        try:
            bars = out.isatty() and os.get_terminal_size(out.fileno()).columns > 0
        except (OSError, ValueError):
            bars = False
        return cls(out, bars=bars)

    def _line(self, text: str) -> None:
        if self.bars:
            tqdm.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def update(self, obj: dict[str, Any]) -> None:
        """One progress object from the server."""
        digest = str(obj.get("digest") or "")
        if not digest:
            status = str(obj.get("status") or "")
            if status and status != self._last:
                self._last = status
                self._line(status)
            return
        total, completed = int(obj.get("total") or 0), int(obj.get("completed") or 0)
        if not self.bars:
            if digest not in self._seen:
                self._seen.add(digest)
                self._line(_label(obj))
            return
        bar = self._bars.get(digest)
        if bar is None:
            if completed == 0 or digest in self._seen:  # the announcement before a download (Ollama skips
                return  # it too), or a file already drawn to its end
            self._seen.add(digest)
            bar = tqdm(total=total, initial=completed, desc=_label(obj), unit="B", unit_scale=True,
                       unit_divisor=1000, file=self.out, position=len(self._bars), leave=True, bar_format=_BAR)
            self._bars[digest] = bar
        else:
            if total and total != bar.total:
                bar.total = total
            bar.update(completed - bar.n)
        if total and completed >= total:
            self._bars.pop(digest).close()

    @contextlib.contextmanager
    def copying(self, name: str, digest: str, data: BinaryIO, size: int) -> Iterator[BinaryIO]:
        """A file going up as a blob: a bar over its reads on a terminal, else one line."""
        if not self.bars:
            self._line(f"copying file {name} ({digest})")
            yield data
            return
        with tqdm.wrapattr(data, "read", total=size, desc=f"copying file {name}", unit="B", unit_scale=True,
                           unit_divisor=1000, file=self.out, leave=True, bar_format=_BAR) as wrapped:
            yield wrapped

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

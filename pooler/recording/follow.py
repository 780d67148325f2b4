"""Following a live session: the records of one session as the writer adds them.

Rules this module keeps:
- Only whole lines are read (the writer may be in the middle of one); a file is read from where
  the last poll stopped, by byte offset while it is open and by line count once it has been
  closed and compressed under another name (the lines already seen are skipped), so rotation
  loses or repeats nothing.
- It ends when the session's ``logout`` record arrives, or when ``stop()`` says so.
- Each poll goes on from where the last one stopped: files it is done with are not read again,
  and the day directories before the oldest file it still reads are not even listed. A session
  followed from its start (``follow_session(..., start=)``) is read from the file it began in,
  not from the first file of the directory.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterator

import orjson

from .files import list_files, read_lines
from .format import unfold
from .reader import _window


class Tail:
    """New records under ``root``, poll by poll (``poll()`` -> records since the last call)."""

    def __init__(self, root: str | os.PathLike, from_seq: int = 0) -> None:
        self.root = root
        self.seq = from_seq  # files before this one are done with
        self.day: str | None = None  # the day directory of file ``seq`` (earlier ones are not listed)
        self.offset: dict[int, int] = {}  # open file: bytes consumed
        self.lines: dict[int, int] = {}  # lines consumed, per file

    def poll(self) -> list[dict]:
        out: list[dict] = []
        files = list_files(self.root, self.day)
        for f in files:
            if f.seq < self.seq:
                continue
            done = self.lines.get(f.seq, 0)
            if f.is_open:
                try:
                    with open(f.path, "rb") as fh:
                        fh.seek(self.offset.get(f.seq, 0))
                        data = fh.read()
                except FileNotFoundError:
                    continue  # compressed meanwhile: read as such at the next poll
                end = data.rfind(b"\n")
                if end < 0:
                    continue
                chunk = data[: end + 1].split(b"\n")[:-1]
                self.offset[f.seq] = self.offset.get(f.seq, 0) + end + 1
                self.lines[f.seq] = done + len(chunk)
            else:
                try:
                    all_lines, _ = read_lines(f.path)
                except FileNotFoundError:
                    continue
                chunk = all_lines[done:]
                self.lines[f.seq] = len(all_lines)
                self.seq = max(self.seq, f.seq + 1)  # closed: nothing more will be added to it
            for line in chunk:
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if type(rec) is dict:
                    out.extend(unfold(rec))
        for f in files:  # where the next poll starts listing
            if f.seq >= self.seq:
                self.day = f.path.parent.name
                break
        return out

    @classmethod
    def since(cls, root: str | os.PathLike, start: float | None) -> "Tail":
        """A tail from the first file that may hold records made at ``start`` (epoch seconds)
        or later: the files before it are never read."""
        if start is None:
            return cls(root)
        files = list_files(root)
        a, _ = _window(files, start, None)
        return cls(root, files[a].seq if files else 0)


def follow_session(root: str | os.PathLike, sid: str, interval: float = 0.2,
                   stop: Callable[[], bool] | None = None, start: float | None = None) -> Iterator[dict]:
    """Every record of session ``sid``: those written already, then the new ones as they are
    written, until its logout (or ``stop()``). ``start``: when the session began (its login's
    ``ts``): the files before the one it began in are skipped."""
    tail = Tail.since(root, start)
    while True:
        for rec in tail.poll():
            if rec.get("sid") != sid:
                continue
            yield rec
            if rec.get("t") == "logout":
                return
        if stop is not None and stop():
            return
        time.sleep(interval)

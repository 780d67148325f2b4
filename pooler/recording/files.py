"""Where records live on disk, and the decisions about files: names, rotation, retention.

Rules this module keeps:
- ``record_dir/YYYY-MM-DD/rec-SSSSSSSS-YYYYMMDDTHHMMSSZ.jsonl`` (UTC): one directory per day,
  the sequence number ``S`` counts files across days and restarts (a missing number is a
  deleted file), the time is when the file was opened. A closed file is compressed
  (``.jsonl.gz``, or ``.jsonl.zst``); only the newest file is ever open.
- Decisions are pure functions of numbers (sizes, times): ``rotate_due`` and ``retention``;
  the writer thread carries them out.
- Reading (``read_lines``) tells a cut-off file from a whole one: a plain file whose last line
  has no newline, or a compressed stream that ends early, is reported, never hidden.
"""

from __future__ import annotations

import gzip
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

NAME = re.compile(r"^rec-(\d{8})-(\d{8}T\d{6}Z)\.jsonl(\.gz|\.zst)?$")
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
COMPRESSIONS = ("gzip", "zstd", "none")
SUFFIX = {"gzip": ".gz", "zstd": ".zst", "none": ""}


@dataclass(slots=True, frozen=True)
class RecFile:
    path: Path
    seq: int
    opened: str  # YYYYMMDDTHHMMSSZ
    compressed: str  # "", ".gz" or ".zst"
    size: int
    mtime: float

    @property
    def is_open(self) -> bool:
        """Not closed yet (or left open by a gateway that stopped without closing it)."""
        return self.compressed == ""


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def file_name(seq: int, t: float) -> str:
    return f"rec-{seq:08d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(t))}.jsonl"


def list_files(root: str | os.PathLike, from_day: str | None = None) -> list[RecFile]:
    """Every recording file under ``root``, in sequence order (oldest first); with ``from_day``
    (``YYYY-MM-DD``) only those in that day's directory and later ones."""
    out = []
    root = Path(root)
    try:
        days = sorted(d for d in os.listdir(root) if DAY.match(d) and (from_day is None or d >= from_day))
    except FileNotFoundError:
        return []
    for d in days:
        try:
            names = os.listdir(root / d)
        except (NotADirectoryError, FileNotFoundError):
            continue
        for name in names:
            mt = NAME.match(name)
            if mt is None:
                continue
            p = root / d / name
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append(RecFile(p, int(mt.group(1)), mt.group(2), mt.group(3) or "", st.st_size, st.st_mtime))
    out.sort(key=lambda f: (f.seq, f.compressed == ""))
    return out


def rotate_due(size: int, opened_at: float, now: float, rotate_size: int, rotate_age: float) -> bool:
    """A file must be closed: it reached ``rotate_size`` bytes, is ``rotate_age`` seconds old
    (0: no limit), or the UTC day changed since it was opened."""
    if rotate_size and size >= rotate_size:
        return True
    if rotate_age and now - opened_at >= rotate_age:
        return True
    return day_of(opened_at) != day_of(now)


def retention(files: list[RecFile], now: float, days: float, size_cap: int, keep: Path | None) -> list[RecFile]:
    """The files to remove, oldest first: those closed more than ``days`` days ago (0: kept
    however old), then the oldest while the total exceeds ``size_cap`` bytes (0: no cap). The
    file being written (``keep``) is never removed."""
    gone: list[RecFile] = []
    taken: set[Path] = set()  # the paths in ``gone``: a set, so that thousands of files stay linear
    candidates = [f for f in files if f.path != keep]
    if days:
        limit = now - days * 86400
        for f in candidates:
            if f.mtime < limit:
                gone.append(f)
                taken.add(f.path)
    if size_cap:
        total = sum(f.size for f in files if f.path not in taken)
        for f in candidates:
            if total <= size_cap:
                break
            if f.path in taken:
                continue
            gone.append(f)
            taken.add(f.path)
            total -= f.size
    gone.sort(key=lambda f: f.seq)
    return gone


class Truncated(Exception):
    """A file ends in the middle of a record or of its compressed stream."""


def read_lines(path: Path) -> tuple[list[bytes], str | None]:
    """The lines of a recording file (without newlines) and, if it is cut off, why."""
    name = path.name
    problem = None
    if name.endswith(".gz"):
        raw = b""
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        except (EOFError, OSError, zlib.error) as e:
            problem = f"compressed stream cut short ({type(e).__name__}: {e})"
            raw = _gzip_salvage(path)
    elif name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as f:
            data = f.read()
        try:
            d = zstandard.ZstdDecompressor().decompressobj()
            raw = d.decompress(data)
            if not d.eof:
                problem = "compressed stream cut short (zstd frame incomplete)"
        except zstandard.ZstdError as e:
            problem = f"compressed stream damaged ({e})"
            raw = b""
    else:
        with open(path, "rb") as f:
            raw = f.read()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        problem = problem or "last record cut off (no newline at the end)"
        lines.pop()
    return lines, problem


def _gzip_salvage(path: Path) -> bytes:
    """What can still be decompressed of a cut-off gzip file."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return d.decompress(data)
    except zlib.error:
        return b""


def compress(path: Path, how: str) -> Path:
    """Compress a closed file beside itself (written whole, synced, then renamed), remove the
    plain one; -> the compressed file."""
    if how == "none":
        return path
    target = path.with_name(path.name + SUFFIX[how])
    tmp = target.with_name(target.name + ".tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        data = src.read()
        if how == "gzip":
            dst.write(gzip.compress(data, compresslevel=6, mtime=0))
        else:
            import zstandard

            dst.write(zstandard.ZstdCompressor(level=1).compress(data))
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, target)
    os.unlink(path)
    return target

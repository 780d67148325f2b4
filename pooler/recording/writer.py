"""The writer thread: chunks of encoded records from the event loop, sealed into the hash chain
and written to rotating files (files.py) under ``record_dir``.

Rules this module keeps:
- The event loop never waits for a disk, nor for a lock: it hands whole chunks over
  (``submit``: a deque append), the thread looks for them every ``POLL`` seconds and does the
  hashing, writing, syncing, rotating, compressing and retention, letting the loop have the
  interpreter lock every 128 records.
- The chain in a file is never broken by a failure: a write that fails is cut back to the last
  whole record (``ftruncate``), the chain continues from the last record actually written, and
  the first record written after the failure is a ``gap`` saying how many were lost.
- The file written must still be the file at its path (``os.stat`` against ``fstat`` before each
  chunk): a file or directory removed under the writer is a failure, not a silent write into
  an unlinked inode. ``record_dir`` itself is never recreated once the writer started.
- State the loop reads (``failing``, counters) are plain attributes set by the thread.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import hmac
import logging
import math
import os
import threading
import time
from pathlib import Path

from .files import RecFile, compress, file_name, day_of, list_files, read_lines, retention, rotate_due
from .format import FORMAT_VERSION, GENESIS, SUFFIX_LEN, encode, key_id, link, seal, unseal

_sha256 = hashlib.sha256
_hmac_digest = hmac.digest

log = logging.getLogger("pooler.recording")

RETRY_EVERY = 1.0  # seconds between attempts while writing fails
POLL = 0.05  # the thread looks for chunks this often (the loop hands one over every 100 ms)
# The thread shares the interpreter lock with the proxy loop: every 128 records it lets the loop
# have it (time.sleep(0) releases it), so a chunk of thousands never stalls every client at once
YIELD_EVERY = 127


def _yield_gil() -> None:
    time.sleep(0)


def seal_run(data: bytes | bytearray, pos: int, prev: bytes, size: int, limit: int,
             key: bytes | None) -> tuple[bytes, int, bytes, int, int]:
    """Seal the records of ``data`` from offset ``pos`` (each one line, newline-terminated,
    without ``h``) into the chain after ``prev``, the file holding ``size`` bytes so far: (the
    bytes to write, the offset after the last record sealed, its ``h``, the file's size after
    them, how many were sealed). Stops after the record that brings the file to ``limit``
    (record_rotate_size): the rest goes to the next file. ``format.link`` and ``format.seal``,
    inlined: the writer's whole work per record. The compiled twin (``_seal.seal_run``, used
    where built) gives the same (tests/test_recording_seal_compiled.py)."""
    out = []
    put = out.append
    count = 0
    find = data.find
    while True:
        end = find(b"\n", pos)
        if end < 0:
            break
        body = bytes(data[pos:end])
        if key:
            prev = _hmac_digest(key, prev + body, "sha256").hex().encode()
        else:
            prev = _sha256(prev + body).hexdigest().encode()
        put(body[:-1])
        put(b',"h":"')
        put(prev)
        put(b'"}\n')
        size += len(body) + SUFFIX_LEN  # the line: body less "}", the suffix, a newline
        pos = end + 1
        count += 1
        if not count & YIELD_EVERY:
            _yield_gil()
        if size >= limit:
            break
    return b"".join(out), pos, prev, size, count


python_seal_run = seal_run
compiled_seal_run = None
if not os.environ.get("POOLER_PURE_PYTHON"):
    try:
        from ._seal import seal_run as compiled_seal_run
    except ImportError:
        pass
    else:
        seal_run = compiled_seal_run


class Writer:
    def __init__(self, root: str | os.PathLike, *, gateway: str, rotate_size: int = 64 << 20,
                 rotate_age: float = 3600.0, retention_days: float = 0.0, retention_size: int = 0,
                 compression: str = "gzip", fsync: float = 1.0, key: bytes | None = None,
                 max_queued: int = 200_000) -> None:
        self.root = Path(root)
        self.gateway = gateway
        self.rotate_size = rotate_size
        self.rotate_age = rotate_age
        self.retention_days = retention_days
        self.retention_size = retention_size
        self.compression = compression
        self.fsync = fsync  # 0: after every chunk; math.inf: only when a file is closed; else at most this late
        self.key = key or None
        self.max_queued = max_queued
        # shared with the loop without a lock: deque append/popleft are atomic, and each counter
        # has one thread that writes it (a lock here made the loop wait for the interpreter lock
        # behind the writer: a convoy of milliseconds at each hand-over)
        self._chunks: collections.deque = collections.deque()  # (bytes, records) from the loop
        self.submitted = 0  # records the loop handed over (the loop's)
        self.taken = 0  # ... the thread took, written or lost (the thread's)
        self._dropped = 0  # records the loop dropped: the thread far behind (the loop's)
        self._dropped_seen = 0  # (the thread's)
        self._lost = 0  # records the thread could not write (the thread's)
        self._noted = 0  # records lost before they reached this writer (lose(): the loop's)
        self._noted_reason = ""  # (the loop's)
        self._noted_seen = 0  # (the thread's)
        self._stopping = False
        self.failing: str | None = None  # why records cannot be written now (None: they can)
        self._dropped_looked = 0  # behind(): drops already reported
        self.records = 0  # records written
        self.bytes = 0  # bytes written (before compression)
        self.failures = 0  # failed attempts to write
        self.files_opened = 0
        # the thread's own
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._ino = 0
        self._size = 0
        self._opened_at = 0.0
        self._opened_mono = 0.0
        self._before_open = (GENESIS, 0)  # the chain and sequence before the file now open
        self._in_file = 0
        self._seq = 0
        self._prev = GENESIS
        self._unsynced = 0.0  # when the oldest unsynced write happened (0: none)
        self._gap = 0  # records lost since the last record written
        self._gap_reason = ""
        self._logged_failure = False

    # ------------------------------------------------------------------ the loop's side

    def submit(self, chunk: bytes | list[bytes], count: int | None = None) -> None:
        """Hand encoded records (format.encode, without ``h``) to the thread: newline-terminated
        records in one bytes object (what the loop builds: one growing buffer, no object per
        record), or a list of records; ``count``: how many records the bytes hold."""
        if type(chunk) is list:
            count = len(chunk)
            chunk = b"".join(line + b"\n" for line in chunk)
        elif count is None:
            count = chunk.count(b"\n")
        if self.submitted - self.taken + count > self.max_queued:
            self._dropped += count  # the thread is far behind (a stuck disk): count, never wait
            return
        self._chunks.append((chunk, count))
        self.submitted += count

    def lose(self, count: int, reason: str) -> None:
        """Records lost before they reached this writer (the writer process, process.py: a
        process that died with them, or chunks the gateway dropped): counted in ``lost``, and
        the next records written follow a ``gap`` record that counts them."""
        self._noted_reason = reason
        self._noted += count

    @property
    def queued(self) -> int:
        """Records handed over and not yet written (or lost)."""
        return self.submitted - self.taken

    @property
    def lost(self) -> int:
        """Records that could not be written."""
        return self._lost + self._dropped + self._noted

    def start(self) -> None:
        """Find where the chain stands (synchronously, before traffic), then start the thread.
        Raises OSError if ``record_dir`` cannot be created or read."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._thread = threading.Thread(target=self._run, name="pooler-recording", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, close (and compress) the file; waits for the thread."""
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def current_file(self) -> Path | None:
        return self._path

    # ------------------------------------------------------------------ the thread

    def behind(self) -> str | None:
        """Why records are not being written although nothing raised (None: they are): the
        thread is gone, or it fell so far behind that records were dropped since the last
        look. Read by the loop with ``failing``, so that record_failure = block blocks."""
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return self.failing or "the recording writer thread stopped"
        dropped, self._dropped_looked = self._dropped - self._dropped_looked, self._dropped
        if dropped or self.queued >= self.max_queued:
            return f"the recording writer fell behind ({self.queued} records queued, {dropped} dropped)"
        return None

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a writer that dies must be seen: failing stays set
            self.failing = f"the recording writer failed ({type(e).__name__}: {e})"
            log.exception("recordings: the writer thread failed; nothing more is written")

    def _loop(self) -> None:
        queue = self._chunks
        while True:
            if not queue and not self._stopping:
                time.sleep(min(self._wait_time(), POLL))
            stopping = self._stopping
            chunks, count = [], 0
            while queue:
                c, k = queue.popleft()
                chunks.append(c)
                count += k
            dropped = self._dropped - self._dropped_seen
            if dropped:
                self._dropped_seen += dropped
                self._gap += dropped
                self._gap_reason = self._gap_reason or "the writer fell behind"
            noted = self._noted - self._noted_seen
            if noted:
                self._noted_seen += noted
                self._gap += noted
                self._gap_reason = self._gap_reason or self._noted_reason
                dropped += noted
            data = (b"".join(chunks) if len(chunks) != 1 else chunks[0]) if chunks else b""
            if data and data[-1] != 10:  # (chunks end with a newline: nothing after the last is a record)
                data = data[:data.rfind(b"\n") + 1]
            if data or self.failing is not None or (dropped and self._fd is not None):
                self._write(data)
            self.taken += count
            self._timers()
            if stopping:
                if queue:
                    continue
                if self._fd is not None:
                    try:
                        self._close("shutdown")
                    except OSError as e:
                        log.error("recordings: could not close %s: %s", self._path, e)
                return

    def _wait_time(self) -> float:
        waits = [RETRY_EVERY if self.failing is not None else 60.0]
        now = time.monotonic()
        if self._unsynced and self.fsync not in (0.0, math.inf):
            waits.append(max(self._unsynced + self.fsync - now, 0.0))
        if self._fd is not None and self.rotate_age:
            waits.append(max(self._opened_mono + self.rotate_age - now, 0.0))
        return max(min(waits), 0.001)

    def _timers(self) -> None:
        """Sync when due, rotate an idle file that got too old (or saw the day change)."""
        try:
            if self._fd is not None and self._unsynced and self.fsync not in (0.0, math.inf):
                if time.monotonic() - self._unsynced >= self.fsync:
                    os.fsync(self._fd)
                    self._unsynced = 0.0
            if self._fd is not None and self._in_file > 1:
                self._maybe_rotate()
        except OSError as e:
            self._failed(e, 0)

    def _write(self, data: bytes | bytearray) -> None:
        """Seal and write ``data`` (records, one per line); a file that reaches
        record_rotate_size is closed in the middle of the chunk and the rest goes to the next one."""
        pos = 0  # where the records not yet written begin
        gap = 1 if self._gap else 0  # a gap record goes first
        ours = 0  # ... and is in data, not yet written (never counted as lost)
        try:
            if self._fd is None:
                self._open()
            else:
                self._check_path()
            if gap:
                data = encode({"t": "gap", "ts": round(time.time(), 6), "lost": self._gap,
                               "reason": self._gap_reason}) + b"\n" + data
                ours = 1
            key, limit, n = self.key, self.rotate_size or (1 << 62), len(data)
            while True:
                out, pos, prev, size, count = seal_run(data, pos, self._prev, self._size, limit, key)
                self._write_all(out)
                self._prev, self._size = prev, size
                self._in_file += count
                self.records += count
                self.bytes += len(out)
                if gap:
                    log.warning("recordings: writing again to %s after losing %d record(s)", self._path, self._gap)
                    self._gap, self._gap_reason, gap, ours = 0, "", 0, 0
                if self.failing is not None:
                    self.failing = None
                    self._logged_failure = False
                if pos >= n:
                    break
                self._close("rotate")
                self._open()
            if self.fsync == 0.0:
                os.fsync(self._fd)
            elif not self._unsynced:
                self._unsynced = time.monotonic()
            self._maybe_rotate()
        except OSError as e:
            self._failed(e, data.count(b"\n", pos) - ours)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)  # never leave half a record behind
            except OSError:
                pass
            raise

    def _failed(self, e: OSError, lost: int) -> None:
        why = f"{e.strerror or e} ({self._path or self.root})" if isinstance(e, OSError) else str(e)
        if getattr(e, "errno", None) == errno.ENOSPC:
            why = f"no space left on the device of {self.root}"
        self.failures += 1
        self._lost += lost
        self._gap += lost
        self._gap_reason = why
        self.failing = why
        if not self._logged_failure:
            log.error("recordings cannot be written: %s", why)
            self._logged_failure = True
        # drop the file: the next attempt opens a new one (the chain goes on from the last record
        # written); a file that got no record but its header is removed, as if never opened
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            if self._in_file <= 1 and self._path is not None:
                try:
                    os.unlink(self._path)
                except OSError:
                    pass
                self._prev, self._seq = self._before_open
        self._fd = None
        self._path = None

    def _check_path(self) -> None:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, "the recording file was removed", str(self._path)) from None
        if st.st_ino != self._ino:
            raise OSError(errno.ENOENT, "the recording file was replaced", str(self._path))

    def _open(self) -> None:
        if not self.root.is_dir():
            raise OSError(errno.ENOENT, f"record_dir {self.root} does not exist", str(self.root))
        now = time.time()
        day = self.root / day_of(now)
        day.mkdir(exist_ok=True)
        self._before_open = (self._prev, self._seq)
        self._seq += 1
        path = day / file_name(self._seq, now)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        except OSError:
            self._seq -= 1
            raise
        self._fd, self._path, self._size, self._in_file = fd, path, 0, 0
        self._ino = os.fstat(fd).st_ino
        self._opened_at = now
        self._opened_mono = time.monotonic()
        self.files_opened += 1
        header = encode({"t": "file", "ts": round(now, 6), "seq": self._seq, "prev": self._prev.decode(),
                         "alg": "hmac-sha256" if self.key else "sha256", "key_id": key_id(self.key),
                         "format": FORMAT_VERSION, "gateway": self.gateway})
        h = link(self._prev, header, self.key)
        line = seal(header, h)
        self._write_all(line)
        self._prev = h
        self._size = len(line)
        self._in_file = 1
        self.records += 1
        self.bytes += len(line)
        if self.fsync != math.inf:
            os.fsync(fd)
            try:
                dfd = os.open(day, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass

    def _maybe_rotate(self) -> None:
        now = time.time()
        if not rotate_due(self._size, self._opened_at, now, self.rotate_size, self.rotate_age):
            return
        if self.rotate_size and self._size >= self.rotate_size:
            why = "rotate"
        elif day_of(self._opened_at) != day_of(now):
            why = "day"
        else:
            why = "age"
        self._close(why)

    def _close(self, why: str) -> None:
        body = encode({"t": "close", "ts": round(time.time(), 6), "records": self._in_file, "reason": why})
        h = link(self._prev, body, self.key)
        line = seal(body, h)
        self._write_all(line)
        self._prev = h
        self.records += 1
        self.bytes += len(line)
        os.fsync(self._fd)
        os.close(self._fd)
        path, self._fd, self._path = self._path, None, None
        self._unsynced = 0.0
        compress(path, self.compression)
        if why != "shutdown":
            self._retention()

    def _retention(self) -> None:
        if not self.retention_days and not self.retention_size:
            return
        files = list_files(self.root)
        gone = retention(files, time.time(), self.retention_days, self.retention_size, self._path)
        if not gone:
            return
        removed = []
        for f in gone:
            try:
                os.unlink(f.path)
                removed.append(f)
            except FileNotFoundError:
                pass
            try:
                f.path.parent.rmdir()  # its day, once empty
            except OSError:
                pass
        if removed:
            log.info("recordings: retention removed %d file(s), oldest %s", len(removed), removed[0].path.name)
            rec = {"t": "retention", "ts": round(time.time(), 6), "removed": [f.path.name for f in removed],
                   "why": "days" if self.retention_days and removed[-1].mtime < time.time() - self.retention_days * 86400 else "size"}
            self._chunks.appendleft((encode(rec) + b"\n", 0))  # (not the loop's: not counted as taken)

    # ------------------------------------------------------------------ start: where the chain stands

    def _recover(self) -> None:
        files = list_files(self.root)
        if not files:
            return
        self._seq = max(f.seq for f in files)
        last = files[-1]
        lines, problem = read_lines(last.path)  # whole lines only: a half-written last one is left out
        prev = None
        for line in lines:  # the chain goes on from the last record that reads (a damaged one
            got = unseal(line)  # in the middle stays where it is, for verify to report)
            if got is not None:
                prev = got[1]
        good = sum(len(line) + 1 for line in lines)  # bytes of whole lines (plain files)
        if prev is not None:
            self._prev = prev
        if last.is_open:
            self._close_left_open(last, lines, good, problem)

    def _close_left_open(self, f: RecFile, lines: list[bytes], good: int, problem: str | None) -> None:
        """A file a gateway left open (it stopped without closing it): cut a half-written last
        record (only that: a damaged line before it is evidence, kept for verify), add a
        ``close`` record saying so, compress it."""
        fd = os.open(f.path, os.O_WRONLY | os.O_APPEND)
        try:
            cut = f.size - good
            if cut:
                os.ftruncate(fd, good)
            rec = {"t": "close", "ts": round(time.time(), 6), "records": len(lines), "reason": "recovered"}
            if cut:
                rec["cut_bytes"] = cut
            body = encode(rec)
            h = link(self._prev, body, self.key)
            os.write(fd, seal(body, h))
            self._prev = h
            os.fsync(fd)
        finally:
            os.close(fd)
        log.warning("recordings: %s was left open by a gateway that stopped without closing it; closed now%s",
                    f.path, f" ({f.size - good} bytes of a cut-off record removed)" if f.size - good else "")
        compress(f.path, self.compression)

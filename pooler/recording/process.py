"""The writer process: the recorder's chunks written by a child process running the same
``Writer`` (writer.py), so that hashing, writing and compressing take neither the gateway's
interpreter lock nor its core.

Rules this module keeps:
- The event loop never waits: ``submit`` appends a frame to a queue and writes what the pipe
  takes (``os.write`` on a non-blocking pipe); what it does not take stays queued, in memory,
  up to ``max_queued`` records (handed over and not yet written, in the gateway or in the
  child), beyond which chunks are dropped and counted, as ``Writer.submit`` does.
- One source of truth: the child (``python -m pooler.recording.process``, started with
  ``subprocess``: exec'd, never a fork of the running loop) builds a ``Writer`` and feeds it the
  chunks; the chain, rotation, retention, compression, fsync and failure handling are that
  class's. Its figures come back as JSON lines on a second pipe (every 50 ms while they change,
  and at least once a second), and so do its log records, logged again by the gateway.
- A child that dies (or exits because its writer thread died) is a failure: ``failing`` says so
  (statements are refused under ``record_failure = block``), the records it had been handed and
  had not reported done are counted lost, and a new child is started after a pause (1 s,
  doubling to 30 s while it keeps dying); it closes the file the dead one left open
  (``reason: recovered``), continues the chain, and writes a ``gap`` record first. A child that
  sends nothing for ``STALE`` seconds (stopped, starved) is a failure too, until it reports.
- The child stops when told to (``stop``: everything queued is written, the file closed and
  compressed), or when its input pipe ends (the gateway died): it writes what it got, then
  closes the file the same way. It ignores SIGINT and SIGTERM: the gateway stops it.
- The HMAC key goes to the child through the pipe, never on its command line or environment.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import math
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import orjson

log = logging.getLogger("pooler.recording")

_HEAD = struct.Struct("!cII")  # kind, payload length, records
STALE = 5.0  # seconds without a word from the child before it counts as stuck
REPORT_EVERY = 0.05  # the child reports this often while its figures change
HEARTBEAT = 1.0  # ... and at least this often
RESTART_FIRST, RESTART_MAX = 1.0, 30.0
_F_SETPIPE_SZ = 1031


def _frame(kind: bytes, payload: bytes | bytearray = b"", records: int = 0) -> bytes:
    return _HEAD.pack(kind, len(payload), records) + payload


class WriterProcess:
    """The gateway's side: what ``Writer`` offers the recorder (submit, stop, figures, failing,
    behind), with the writing done in a child process."""

    def __init__(self, root: str | os.PathLike, *, gateway: str, rotate_size: int = 64 << 20,
                 rotate_age: float = 3600.0, retention_days: float = 0.0, retention_size: int = 0,
                 compression: str = "gzip", fsync: float = 1.0, key: bytes | None = None,
                 max_queued: int = 200_000) -> None:
        self.root = Path(root)
        self.key = key or None
        self.max_queued = max_queued
        self._settings = {"root": str(self.root), "gateway": gateway, "rotate_size": rotate_size,
                          "rotate_age": rotate_age, "retention_days": retention_days,
                          "retention_size": retention_size, "compression": compression,
                          "fsync": None if fsync == math.inf else fsync, "key": (key or b"").hex(),
                          "max_queued": max_queued}
        self._seq = 0  # the last file's sequence number when the first child started
        self.proc: subprocess.Popen | None = None
        self._wfd = self._rfd = -1
        self._out: collections.deque = collections.deque()  # [frame bytes, records, offset written]
        self._inbuf = bytearray()
        self._stopping = False
        self._stopped = False
        # counters: the gateway's own
        self.submitted = 0  # records accepted by submit
        self._dropped = 0  # records refused by submit (far behind)
        self._dropped_looked = 0
        self._noted = 0  # losses the gateway told (or will tell) a child about: drops, records a dead child had
        self._sent = 0  # records of the frames begun on the pipe of the current child
        # the children's: those that ended, and the current one's last report
        self._base = {"records": 0, "bytes": 0, "failures": 0, "lost": 0, "done": 0}
        self._cur = {"records": 0, "bytes": 0, "failures": 0, "lost": 0, "noted": 0, "done": 0}
        self._failing: str | None = None  # the child's
        self._file = ""
        self._down: str | None = None  # why there is no working child (None: there is)
        self._heard = 0.0  # monotonic time of the child's last word
        self._ready = False
        self._restart_at = 0.0
        self._restart_wait = RESTART_FIRST
        self._started_at = 0.0
        self._start_error: dict | None = None

    # ------------------------------------------------------------------ figures (the recorder's)

    @property
    def records(self) -> int:
        return self._base["records"] + self._cur["records"]

    @property
    def bytes(self) -> int:
        return self._base["bytes"] + self._cur["bytes"]

    @property
    def failures(self) -> int:
        return self._base["failures"] + self._cur["failures"]

    @property
    def lost(self) -> int:
        # each loss counted once: the children's own, plus those the gateway noted (a child
        # counts the notes it received in its ``lost``: taken out here)
        return self._base["lost"] + self._cur["lost"] - self._cur["noted"] + self._noted

    @property
    def queued(self) -> int:
        return self.submitted - self._base["done"] - self._cur["done"]

    @property
    def current_file(self) -> Path | None:
        return Path(self._file) if self._file else None

    @property
    def failing(self) -> str | None:
        return self._down or self._failing

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def behind(self) -> str | None:
        """As ``Writer.behind``: the child gone or silent, or records dropped since the last look."""
        if self._down is not None and not self._stopping:
            return self._down
        if self._ready and not self._stopping and time.monotonic() - self._heard > STALE:
            return (f"the recording writer process (pid {self.pid}) does not answer "
                    f"(nothing from it for {time.monotonic() - self._heard:.0f}s)")
        dropped, self._dropped_looked = self._dropped - self._dropped_looked, self._dropped
        if dropped or self.queued >= self.max_queued:
            return f"the recording writer fell behind ({self.queued} records queued, {dropped} dropped)"
        return None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Start the child and wait until its writer found where the chain stands (before any
        traffic: blocking here is fine). Raises OSError if record_dir cannot be used."""
        self._spawn(create=True)
        deadline = time.monotonic() + timeout
        while not self._ready:
            left = deadline - time.monotonic()
            alive = True
            if left > 0:
                select.select([self._rfd], [], [], left)
                alive = self._read()
            if self._start_error is not None or not alive or left <= 0:
                err = self._start_error or (("errno", errno.EIO), ("m", "the recording writer process did not start"))
                self._kill()
                err = dict(err)
                raise OSError(err.get("errno") or errno.EIO, err["m"])
        log.info("recordings: writer process %d started", self.proc.pid)

    def _spawn(self, create: bool) -> None:
        crfd, wfd = os.pipe()  # gateway -> child: frames
        rfd, cwfd = os.pipe()  # child -> gateway: JSON lines
        try:
            fcntl.fcntl(wfd, _F_SETPIPE_SZ, 1 << 20)  # fewer chunks waiting in the gateway
        except OSError:
            pass
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parent.parent.parent)  # the child runs this very code
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "pooler.recording.process", str(crfd), str(cwfd)],
                                         pass_fds=(crfd, cwfd), stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            os.close(wfd)  # no child to talk to: the gateway's ends go too (tried again later)
            os.close(rfd)
            raise
        finally:
            os.close(crfd)
            os.close(cwfd)
        self._wfd, self._rfd = wfd, rfd
        self._inbuf = bytearray()
        self._sent = 0
        self._cur = {"records": 0, "bytes": 0, "failures": 0, "lost": 0, "noted": 0, "done": 0}
        self._ready = False
        self._start_error = None
        self._started_at = self._heard = time.monotonic()
        settings = dict(self._settings, create=create)
        self._out.appendleft([_frame(b"I", orjson.dumps(settings)), 0, 0])
        self._pump()

    def submit(self, chunk: bytes | bytearray, count: int) -> None:
        """Hand ``count`` newline-terminated records over (never waits)."""
        if self.queued + count > self.max_queued:
            self._dropped += count  # far behind (a stuck disk, a child gone): count, never wait
            self._note(count, "the writer fell behind")
            return
        self.submitted += count
        self._out.append([_frame(b"C", chunk, count), count, 0])
        self._pump()

    def _note(self, count: int, reason: str, first: bool = False) -> None:
        """Tell the (next) child that ``count`` records were lost here: it writes a gap record."""
        self._noted += count
        if first:
            self._out.appendleft([_frame(b"L", reason.encode(), count), count, 0])
            return
        last = self._out[-1] if self._out else None
        if last is not None and last[0][:1] == b"L" and not last[2] and last[0][_HEAD.size:].decode() == reason:
            last[1] += count
            last[0] = _frame(b"L", reason.encode(), last[1])
        else:
            self._out.append([_frame(b"L", reason.encode(), count), count, 0])
        self._pump()

    def poll(self) -> None:
        """On the loop's tick: write what waits, read the child's reports, notice its death,
        start a new one when due."""
        if self._stopped:
            return
        if self.proc is None:
            if self._down is not None and not self._stopping and time.monotonic() >= self._restart_at:
                try:
                    self._spawn(create=False)
                except OSError as e:
                    self.proc = None
                    self._died(f"the recording writer process could not be started ({e})")
            return
        self._pump()
        self._read()
        if self.proc.poll() is not None:
            self._read()
            self._died(None)

    def stop(self, timeout: float = 15.0) -> None:
        """Everything handed over is written, the file closed (and compressed); waits for the child."""
        if self._stopped:
            return
        self._stopping = True
        if self.proc is not None:
            self._out.append([_frame(b"S"), 0, 0])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    w = [self._wfd] if self._out and self._ready else []
                    select.select([self._rfd], w, [], min(max(deadline - time.monotonic(), 0.0), 0.1))
                except (OSError, ValueError):
                    break
                self._pump()
                if not self._read():
                    break  # the child closed its end: done (or dead)
            try:
                self.proc.wait(max(deadline - time.monotonic(), 0.5))
            except subprocess.TimeoutExpired:
                log.error("recordings: the writer process did not stop in time; killed")
        if self.queued:
            log.error("recordings: %d record(s) not written at stop", self.queued)
        self._kill()
        self._stopped = True

    # ------------------------------------------------------------------ the pipes

    def _pump(self) -> None:
        """Write the frames waiting, as far as the pipe takes them (the child's settings first;
        the rest once it is ready, so that a child that cannot start takes none with it)."""
        fd = self._wfd
        if fd < 0:
            return
        out = self._out
        while out:
            item = out[0]
            data, done = item[0], item[2]
            if not self._ready and data[:1] != b"I":
                return
            try:
                n = os.write(fd, memoryview(data)[done:])
            except BlockingIOError:
                return
            except OSError:
                return  # the child is gone: poll() notices
            if not done and data[:1] == b"C":
                self._sent += item[1]
            item[2] = done = done + n
            if done < len(data):
                return
            out.popleft()

    def _read(self) -> bool:
        """Read what the child said; False at the end of its pipe."""
        if self._rfd < 0:
            return False
        alive = True
        while True:
            try:
                data = os.read(self._rfd, 65536)
            except BlockingIOError:
                break
            except OSError:
                alive = False
                break
            if not data:
                alive = False
                break
            self._inbuf += data
        buf = self._inbuf
        if b"\n" in buf:
            end = buf.rindex(b"\n")
            lines, self._inbuf = bytes(buf[:end]).split(b"\n"), buf[end + 1:]
            self._heard = time.monotonic()
            for line in lines:
                self._message(orjson.loads(line))
        return alive

    def _message(self, m: dict) -> None:
        k = m["k"]
        if k == "log":
            log.log(m["lv"], "%s", m["m"])
            return
        if k == "error":  # the writer could not start
            self._start_error = m
            return
        if k == "ready":
            self._ready = True
            self._seq = m["seq"]
            if self._down is not None:
                log.warning("recordings: writer process %d took over", self.proc.pid)
            self._down = None
            self._pump()
            return
        cur = self._cur
        for name in cur:
            cur[name] = m[name]
        self._failing = m["failing"]
        self._file = m["file"]

    def _died(self, why: str | None) -> None:
        """The child ended (or could not start): count what it had, plan the next one."""
        proc = self.proc
        pid = None
        if proc is not None:
            pid = proc.pid
            rc = proc.poll()
            if why is None:
                how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
                if self._start_error is not None:
                    why = f"the recording writer process could not start: {self._start_error['m']}"
                elif rc == 3 and self._failing:
                    why = self._failing  # its writer thread died, and said why
                else:
                    why = f"the recording writer process died ({how})"
        # what it had been handed and did not report done is lost (some of it may be written)
        cur = self._cur
        for name in ("records", "bytes", "failures"):
            self._base[name] += cur[name]
        self._base["lost"] += cur["lost"] - cur["noted"]
        self._base["done"] += self._sent
        in_flight = self._sent - cur["done"]
        self._cur = {"records": 0, "bytes": 0, "failures": 0, "lost": 0, "noted": 0, "done": 0}
        self._sent = 0
        self._failing = None
        # the head frame may be half written: a chunk's records are among those lost, a note is
        # sent again whole to the next child; its settings are sent again at its start
        out = self._out
        if out and out[0][2]:
            if out[0][0][:1] == b"L":
                out[0][2] = 0
            else:
                out.popleft()
        self._out = out = collections.deque(i for i in out if i[0][:1] != b"I")
        if in_flight:
            self._note(in_flight, why, first=True)
        self._close_pipes()
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        self.proc = None
        self._ready = False
        if proc is not None and time.monotonic() - self._started_at > 60:
            self._restart_wait = RESTART_FIRST  # it had lived a while: start again soon
        self._restart_at = time.monotonic() + self._restart_wait
        if self._down is None or self._down != why:
            log.error("recordings cannot be written: %s%s; a new writer process in %.0fs", why,
                      f" (pid {pid})" if pid else "", self._restart_wait)
        self._restart_wait = min(self._restart_wait * 2, RESTART_MAX)
        self._down = why

    def _close_pipes(self) -> None:
        for fd in (self._wfd, self._rfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wfd = self._rfd = -1

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        self._close_pipes()


# ---------------------------------------------------------------------- the child


class _Reports(logging.Handler):
    """The child's voice: JSON lines to the gateway (blocking writes: the gateway reads them
    on every tick, and while it stops)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.setFormatter(logging.Formatter("%(message)s"))

    def send(self, m: dict) -> bool:
        """False when the gateway is gone (its end of the pipe closed)."""
        data = orjson.dumps(m) + b"\n"
        view = memoryview(data)
        with self.lock:  # the writer thread logs too
            try:
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError:
                return False
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.send({"k": "log", "lv": record.levelno, "m": self.format(record)})


def _figures(w, kind: str = "r") -> dict:
    return {"k": kind, "records": w.records, "bytes": w.bytes, "failures": w.failures, "lost": w.lost,
            "noted": w._noted, "done": w.taken + w._dropped, "failing": w.failing,
            "file": str(w.current_file or "")}


def child(fd_in: int, fd_out: int) -> int:
    from .writer import Writer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway stops us (it writes "S"), or its pipe ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = _Reports(fd_out)
    root_log = logging.getLogger()
    root_log.handlers[:] = [out]
    root_log.setLevel(logging.INFO)
    buf = bytearray()
    pos = 0
    w = None
    stopping = False
    last_sent, last_at = None, 0.0
    while True:
        r, _, _ = select.select([fd_in], [], [], REPORT_EVERY)
        if r:
            data = os.read(fd_in, 1 << 20)
            if not data:
                stopping = True  # the gateway is gone: write what we have, close the file
            else:
                buf += data
        while len(buf) - pos >= _HEAD.size:
            kind, ln, n = _HEAD.unpack_from(buf, pos)
            if len(buf) - pos - _HEAD.size < ln:
                break
            payload = bytes(buf[pos + _HEAD.size: pos + _HEAD.size + ln])
            pos += _HEAD.size + ln
            if kind == b"C":
                w.submit(payload, n)
            elif kind == b"L":
                w.lose(n, payload.decode())
            elif kind == b"S":
                stopping = True
            elif kind == b"I":
                s = orjson.loads(payload)
                root = Path(s["root"])
                if not s["create"] and not root.is_dir():  # record_dir is never recreated
                    out.send({"k": "error", "errno": errno.ENOENT, "m": f"record_dir {root} does not exist"})
                    return 2
                w = Writer(root, gateway=s["gateway"], rotate_size=s["rotate_size"], rotate_age=s["rotate_age"],
                           retention_days=s["retention_days"], retention_size=s["retention_size"],
                           compression=s["compression"], fsync=math.inf if s["fsync"] is None else s["fsync"],
                           key=bytes.fromhex(s["key"]) or None, max_queued=s["max_queued"])
                try:
                    w.start()
                except OSError as e:
                    out.send({"k": "error", "errno": e.errno or 0, "m": str(e.strerror or e)})
                    return 2
                out.send({"k": "ready", "seq": w._seq})
        if pos > (1 << 20) or pos == len(buf):
            del buf[:pos]
            pos = 0
        if w is None:
            if stopping:
                return 0
            continue
        if stopping:
            w.stop()
            out.send(_figures(w, "bye"))
            return 0
        now = time.monotonic()
        fig = _figures(w)
        if fig != last_sent or now - last_at >= HEARTBEAT:
            if not out.send(fig):
                stopping = True  # the gateway is gone: write what we have, close the file
            last_sent, last_at = fig, now
        if w._thread is not None and not w._thread.is_alive():
            out.send(_figures(w))
            return 3  # the writer thread died (failing says why, reported above): a new process takes over


if __name__ == "__main__":
    raise SystemExit(child(int(sys.argv[1]), int(sys.argv[2])))

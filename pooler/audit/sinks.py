"""Where audit documents go: a file of JSON lines, syslog, an HTTP endpoint. Each destination is
a thread behind a bounded queue.

Rules this module keeps:
- The event loop only calls ``put`` (a ``deque.append``, no lock: a lock the writer thread holds
  while it waits for the interpreter lock would stall the loop, the convoy the recorder's writer
  measured): it never waits for a disk, a socket or a receiver. The thread polls every
  ``POLL`` seconds. A full queue drops the event and counts it (``dropped``); a log line says so,
  at most once a minute per destination.
- Each destination counts what it delivered (``sent``) and what it gave up on after bounded
  retries (``failed``); those counters are written by the destination's thread only, ``dropped``
  by the loop only, so plain ints suffice. Prometheus reads them (gateway/metrics.py).
- A destination that is down never stops the others: each has its own queue and thread.
- ``stop`` asks the thread to deliver what is queued and end; it waits at most a moment.
"""

from __future__ import annotations

import errno
import logging
import os
import collections
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .. import __version__
from . import ecs, syslog

log = logging.getLogger("pooler.audit")

_STOP = object()
POLL = 0.05  # seconds between looks at an empty queue
RETRY_PAUSE = 0.5  # the first pause between tries; doubled each time, at most MAX_PAUSE
MAX_PAUSE = 30.0
CHUNK = 1000  # events written at once


@dataclass(frozen=True, slots=True)
class Item:
    line: bytes  # the document's JSON
    severity: int  # syslog severity
    action: str  # event.action (syslog MSGID)
    stamp: str  # @timestamp


class Sink:
    name = "sink"

    def __init__(self, queue_size: int) -> None:
        self.q: collections.deque = collections.deque()
        self.size = queue_size
        self._stopping = False
        self.sent = self.failed = self.dropped = 0
        self._warned = 0.0
        self._thread = threading.Thread(target=self._main, name=f"audit-{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: Item) -> None:
        if len(self.q) >= self.size:
            self.dropped += 1
            now = time.monotonic()
            if now - self._warned > 60:
                self._warned = now
                log.warning("audit %s: queue full (%d events), events are being dropped", self.name, self.size)
            return
        self.q.append(item)

    def stop(self, wait: float = 1.0) -> None:
        """Deliver what is queued and end, waiting at most ``wait`` seconds (a destination that
        hangs: the daemon thread is left to the process's exit)."""
        self._stopping = True
        if self._thread.is_alive():
            self._thread.join(wait)

    def _main(self) -> None:
        try:
            self.run()
        except Exception:  # noqa: BLE001 - a bug here must be seen, and never reach the loop
            log.exception("audit %s: writer stopped", self.name)
        finally:
            self.close()

    def _take(self, first_timeout: float | None, limit: int, until: float | None = None) -> tuple[list[Item], bool]:
        """Up to ``limit`` items: waits for the first (None: for ever), then takes what is there
        (or, with ``until``, waits for more until that monotonic time). -> (items, stopping):
        stopping once ``stop`` was called and the queue is empty."""
        q = self.q
        items: list[Item] = []
        deadline = None if first_timeout is None else time.monotonic() + first_timeout
        while not q:
            if self._stopping:
                return items, True
            if deadline is not None and time.monotonic() >= deadline:
                return items, False
            time.sleep(POLL)
        while len(items) < limit:
            if q:
                items.append(q.popleft())
            elif until is not None and time.monotonic() < until and not self._stopping:
                time.sleep(min(POLL, max(0.0, until - time.monotonic())))
            else:
                break
        return items, self._stopping and not q

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned > 60:
            self._warned = now
            log.warning("audit %s: %s", self.name, what)

    def run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileSink(Sink):
    """JSON lines appended to ``path`` (created 0600). A file moved away (logrotate) is noticed
    and a new one opened at the path; write errors count the chunk as failed and are retried
    with the next chunk."""

    name = "file"

    def __init__(self, path: str, queue_size: int) -> None:
        super().__init__(queue_size)
        self.path = path
        self._f = None
        self._ino: int | None = None

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._f = os.fdopen(fd, "ab")
        self._ino = os.fstat(fd).st_ino

    def _current(self) -> None:
        if self._f is not None:
            try:
                if os.stat(self.path).st_ino == self._ino:
                    return
            except OSError:
                pass
            self.close()
        self._open()

    def run(self) -> None:
        while True:
            items, stopping = self._take(None, CHUNK)
            if items:
                try:
                    self._current()
                    self._f.write(b"".join(i.line + b"\n" for i in items))
                    self._f.flush()
                    self.sent += len(items)
                except OSError as e:
                    self.failed += len(items)
                    self.close()
                    self._warn(f"cannot write {self.path}: {e.strerror or e}; {len(items)} event(s) lost")
            if stopping:
                return

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


class SyslogSink(Sink):
    """RFC 5424 messages to ``udp://host:port``, ``tcp://host:port`` (octet counting) or
    ``unix:/path`` (a datagram socket such as /dev/log, or a stream one, octet counted). A
    stream that breaks is reconnected; a chunk is tried ``retries + 1`` times, pausing between."""

    name = "syslog"

    def __init__(self, target: str, facility: int, queue_size: int, retries: int = 3, timeout: float = 5.0) -> None:
        super().__init__(queue_size)
        self.kind, self.addr = syslog.parse_target(target)
        self.target = target
        self.facility = facility
        self.retries = retries
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._stream = False

    def _connect(self) -> None:
        if self.kind == "udp":
            host, port = self.addr
            family, stype, proto, _, sa = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            s = socket.socket(family, stype, proto)
            s.connect(sa)
            self._stream = False
        elif self.kind == "tcp":
            s = socket.create_connection(self.addr, timeout=self.timeout)
            self._stream = True
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.connect(self.addr)
                self._stream = False
            except OSError as e:
                s.close()
                if e.errno != errno.EPROTOTYPE:
                    raise
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.addr)
                self._stream = True
        s.settimeout(self.timeout)
        self._sock = s

    def _message(self, i: Item) -> bytes:
        return syslog.message(self.facility, i.severity, i.stamp, ecs.HOSTNAME, ecs.PID, i.action, i.line)

    def run(self) -> None:
        while True:
            items, stopping = self._take(None, CHUNK)
            if items:
                self._deliver([self._message(i) for i in items])
            if stopping:
                return

    def _deliver(self, msgs: list[bytes]) -> None:
        while msgs:
            msgs = self._deliver_some(msgs)

    def _deliver_some(self, msgs: list[bytes]) -> list[bytes]:
        """Send ``msgs`` (retrying); -> what is left to send after a datagram too large for
        the socket was dropped (the others still go), else []."""
        pause = RETRY_PAUSE
        for attempt in range(self.retries + 1):
            try:
                if self._sock is not None and self._stream and _peer_closed(self._sock):
                    self.close()  # the collector went away since the last chunk: a new connection
                if self._sock is None:
                    self._connect()
                if self._stream:
                    self._sock.sendall(b"".join(syslog.octet_counted(m) for m in msgs))
                    self.sent += len(msgs)
                else:
                    while msgs:  # one datagram each; what was sent is not sent again
                        self._sock.send(msgs[0])
                        msgs = msgs[1:]
                        self.sent += 1
                return []
            except OSError as e:
                why = e.strerror or str(e)
                if e.errno == errno.EMSGSIZE and msgs:
                    # this datagram never fits: it alone is lost, not the events queued behind it
                    # (nor the socket, which is fine)
                    self.failed += 1
                    self._warn(f"{self.target}: {why}; an event of {len(msgs[0])} bytes not delivered")
                    return msgs[1:]
                self.close()
                if attempt < self.retries:
                    time.sleep(pause)
                    pause = min(pause * 2, MAX_PAUSE)
        self.failed += len(msgs)
        self._warn(f"{self.target}: {why}; {len(msgs)} event(s) not delivered after {self.retries + 1} tries")
        return []

    def close(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            s.close()


class HttpSink(Sink):
    """Batches POSTed to ``url``: up to ``batch`` events, or what arrived within ``flush``
    seconds of the first; NDJSON (``application/x-ndjson``) or one JSON array. A 2xx answer is
    delivery; anything else (a refusal, a timeout, no connection) is tried again ``retries``
    times with doubling pauses, then the batch counts as failed. ``headers`` go with every
    request (an Authorization token read from a file or the environment)."""

    name = "http"

    def __init__(self, url: str, queue_size: int, batch: int = 100, flush: float = 1.0, retries: int = 3,
                 timeout: float = 5.0, fmt: str = "ndjson", headers: dict[str, str] | None = None) -> None:
        super().__init__(queue_size)
        self.url = url
        self.shown = shown_url(url)  # for logs: a token in the address never reaches them
        self.batch = batch
        self.flush = flush
        self.retries = retries
        self.timeout = timeout
        self.fmt = fmt
        self.headers = {"Content-Type": "application/x-ndjson" if fmt == "ndjson" else "application/json",
                        "User-Agent": f"pooler/{__version__}", **(headers or {})}

    def _body(self, items: list[Item]) -> bytes:
        if self.fmt == "ndjson":
            return b"".join(i.line + b"\n" for i in items)
        return b"[" + b",".join(i.line for i in items) + b"]"

    def run(self) -> None:
        while True:
            items, stopping = self._take(None, 1)
            if items and not stopping and self.batch > 1:
                first = time.monotonic()  # the batch closes when full or ``flush`` seconds after this
                more, stopping = self._take(self.flush, self.batch - 1, until=first + self.flush)
                items += more
            if items:
                self._deliver(items)
            if stopping:
                return

    def _deliver(self, items: list[Item]) -> None:
        body = self._body(items)
        pause = RETRY_PAUSE
        why = ""
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, method="POST", headers=self.headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    resp.read()
                    if 200 <= resp.status < 300:
                        self.sent += len(items)
                        return
                    why = f"HTTP {resp.status}"
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError, ValueError) as e:
                why = str(getattr(e, "reason", None) or e)
            if attempt < self.retries:
                time.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)
        self.failed += len(items)
        self._warn(f"{self.shown}: {why}; a batch of {len(items)} event(s) not delivered after {self.retries + 1} tries")


def _peer_closed(s: socket.socket) -> bool:
    """A stream whose peer has closed it (or reset it): writing would lose the first chunk in
    the kernel's buffer before the error shows, so look first (the collector never writes)."""
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True




def shown_url(url: str) -> str:
    """``url`` without its user:password@ and its query (either may carry an API key)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "..." if parts.query else "", ""))

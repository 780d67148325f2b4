"""What the audit tests share: reading the JSON lines a gateway wrote, waiting for documents
with a deadline, and receivers of syslog and HTTP that a test opens on real sockets."""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import time
from pathlib import Path

RFC5424 = re.compile(rb"^<(\d+)>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) pooler (\d+) (\S+) - (\{.*\})$", re.S)


def read_lines(path: Path) -> list[dict]:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_docs(get, pred, n: int = 1, timeout: float = 15.0) -> list[dict]:
    """Poll ``get()`` (a list of documents) until ``n`` of them match ``pred``."""
    deadline = time.monotonic() + timeout
    while True:
        docs = get()
        found = [d for d in docs if pred(d)]
        if len(found) >= n:
            return found
        assert time.monotonic() < deadline, f"{n} matching audit document(s) never came; got {[action(d) for d in docs]}"
        time.sleep(0.05)


def action(d: dict) -> str:
    return d["event"]["action"]


def of(action_name: str):
    return lambda d: d["event"]["action"] == action_name


class SyslogReceiver:
    """A syslog listener on a real socket: ``udp``, ``tcp`` (octet counting) or ``unix``
    (datagram). ``messages`` are the raw RFC 5424 messages received."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.messages: list[bytes] = []
        self.cond = threading.Condition()
        if kind == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", 0))
            self.target = f"udp://127.0.0.1:{self.sock.getsockname()[1]}"
        elif kind == "tcp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(4)
            self.target = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        else:
            path = tmp / "syslog.sock"
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(str(path))
            self.target = f"unix:{path}"
        self.sock.settimeout(0.2)
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _add(self, msg: bytes) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _run(self) -> None:
        while not self._stop:
            try:
                if self.kind == "tcp":
                    conn, _ = self.sock.accept()
                    threading.Thread(target=self._stream, args=(conn,), daemon=True).start()
                else:
                    self._add(self.sock.recv(65536))
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return

    def _stream(self, conn: socket.socket) -> None:
        """RFC 6587 octet counting: LENGTH SP MESSAGE, back to back."""
        buf = b""
        conn.settimeout(None)
        with conn:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while True:
                    sp = buf.find(b" ")
                    if sp < 0:
                        break
                    assert buf[:sp].isdigit(), f"not octet-counted framing: {buf[:40]!r}"
                    n = int(buf[:sp])
                    if len(buf) < sp + 1 + n:
                        break
                    self._add(buf[sp + 1: sp + 1 + n])
                    buf = buf[sp + 1 + n:]

    def documents(self) -> list[dict]:
        with self.cond:
            msgs = list(self.messages)
        out = []
        for raw in msgs:
            m = RFC5424.match(raw)
            assert m is not None, f"not an RFC 5424 message: {raw[:200]!r}"
            doc = json.loads(m.group(6))
            doc["_syslog"] = {"pri": int(m.group(1)), "timestamp": m.group(2).decode(), "host": m.group(3).decode(),
                              "procid": int(m.group(4)), "msgid": m.group(5).decode()}
            out.append(doc)
        return out

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class HttpReceiver:
    """An HTTP endpoint on a real socket (http.server in a thread). ``fail_first`` requests are
    answered 503; with ``hang`` every request is read and never answered. ``batches`` are the
    decoded bodies of the requests answered 200, ``requests`` every request's headers."""

    def __init__(self, fail_first: int = 0, always_fail: bool = False, hang: bool = False) -> None:
        self.batches: list[list[dict]] = []
        self.requests: list[dict] = []
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.hang = threading.Event() if hang else None
        rx = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                rx.requests.append(dict(self.headers))
                if rx.hang is not None:
                    rx.hang.wait(30)
                    return
                if rx.always_fail or len(rx.requests) <= rx.fail_first:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                ctype = self.headers.get("Content-Type", "")
                if "ndjson" in ctype:
                    docs = [json.loads(line) for line in body.splitlines() if line.strip()]
                else:
                    docs = json.loads(body)
                rx.batches.append(docs)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ingest"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def documents(self) -> list[dict]:
        return [d for b in list(self.batches) for d in b]

    def close(self) -> None:
        if self.hang is not None:
            self.hang.set()
        self.server.shutdown()
        self.server.server_close()

"""A bare protocol-3 client and frontend message builders, to send what client libraries never
would: messages cut short or pipelined behind an error, requests without Sync, names in a
client encoding. Names and SQL may be given as ``str`` (encoded as UTF-8) or as ``bytes``."""

from __future__ import annotations

import socket
import struct

from pooler.protocol import messages as m


def _bytes(x: str | bytes) -> bytes:
    return x.encode() if isinstance(x, str) else x


def msg(t: bytes, body: bytes = b"") -> bytes:
    """One frontend message: its type byte, its length, its body."""
    return t + struct.pack("!I", len(body) + 4) + body


def query(sql: str | bytes) -> bytes:
    return msg(b"Q", _bytes(sql) + b"\x00")


def parse(name: str | bytes, sql: str | bytes) -> bytes:
    """Parse of statement ``name`` (empty: the unnamed one), no parameter types."""
    return msg(b"P", _bytes(name) + b"\x00" + _bytes(sql) + b"\x00" + b"\x00\x00")


def bind(portal: str | bytes = b"", stmt: str | bytes = b"") -> bytes:
    """Bind of statement ``stmt`` to ``portal`` (empty: the unnamed ones), no parameters, text results."""
    return msg(b"B", _bytes(portal) + b"\x00" + _bytes(stmt) + b"\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")


def execute(portal: str | bytes = b"", limit: int = 0) -> bytes:
    return msg(b"E", _bytes(portal) + b"\x00" + struct.pack("!i", limit))


def describe(kind: bytes, name: str | bytes = b"") -> bytes:
    """Describe of a statement (``kind`` b"S") or a portal (b"P")."""
    return msg(b"D", kind + _bytes(name) + b"\x00")


def close(kind: bytes, name: str | bytes = b"") -> bytes:
    """Close of a statement (``kind`` b"S") or a portal (b"P")."""
    return msg(b"C", kind + _bytes(name) + b"\x00")


SYNC = msg(b"S")
FLUSH = msg(b"H")


def errors(replies) -> list[dict]:
    return [m.parse_error_fields(body) for t, body in replies if t == b"E"]


def shown(replies) -> str:
    """What the client was shown: the bodies of DataRow, ErrorResponse, NoticeResponse and
    NotificationResponse, as one string to search for values that must not be there."""
    return repr([body for t, body in replies if t in (b"D", b"E", b"N", b"A")])


class Raw:
    """A bare protocol-3 client of a gateway, to send what libraries never would."""

    def __init__(self, gw, user: str, database: str = "shop", **params: str) -> None:
        self.s = socket.create_connection((gw.host, gw.port), timeout=20)
        self.s.sendall(m.startup_message({"user": user, "database": database, **params}))
        self.buf = b""
        self.until_ready()

    def send(self, *msgs: bytes) -> None:
        self.s.sendall(b"".join(msgs))

    def read(self) -> tuple[bytes, bytes]:
        """One message: (type, body). Fails with AssertionError when the connection closes."""
        while True:
            if len(self.buf) >= 5:
                (n,) = struct.unpack("!I", self.buf[1:5])
                if len(self.buf) >= n + 1:
                    t, body = self.buf[:1], self.buf[5 : n + 1]
                    self.buf = self.buf[n + 1 :]
                    return t, body
            chunk = self.s.recv(65536)
            assert chunk, "connection closed"
            self.buf += chunk

    def until(self, kind: bytes) -> list[tuple[bytes, bytes]]:
        """The messages up to and including the first of type ``kind``."""
        out = []
        while True:
            t, body = self.read()
            out.append((t, body))
            if t == kind:
                return out

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        return self.until(b"Z")

    def run(self, *msgs: bytes) -> list[tuple[bytes, bytes]]:
        """Send the messages, read up to ReadyForQuery."""
        self.send(*msgs)
        return self.until_ready()

    def close(self) -> None:
        try:
            self.s.sendall(b"X\x00\x00\x00\x04")
        finally:
            self.s.close()


class RawConn(Raw):
    """A bare client on a socket of its own (to the gateway, or straight to PostgreSQL), whose
    replies are read as short strings that compare equal when two servers answer alike."""

    def __init__(self, sock, user: str, dbname: str = "postgres") -> None:
        self.s = sock
        self.s.settimeout(10)
        self.s.sendall(m.startup_message({"user": user, "database": dbname}))
        self.buf = b""
        self.replies(1)

    def replies(self, zs: int, until: bytes = b"Z"):
        """Message types (and error SQLSTATEs, row values) up to the zs-th message of type ``until``."""
        out = []
        while zs:
            t, body = self.read()
            if t in (b"S", b"N", b"K", b"R"):
                continue
            if t == b"E":
                out.append("E" + m.parse_error_fields(body).get("C", ""))
            elif t == b"D":
                out.append("D" + repr(m.parse_data_row(body)))
            elif t == b"C":
                out.append("C" + body[:-1].decode())
            elif t == b"Z":
                out.append("Z" + body.decode())
            else:
                out.append(t.decode())
            if t == until:
                zs -= 1
        return out


def closed_with(c: Raw, sqlstate: bytes) -> bytes:
    """Read to the end of the connection; the FATAL ErrorResponse's body."""
    err = b""
    try:
        while True:
            t, body = c.read()
            if t == b"E":
                err = body
    except (AssertionError, ConnectionError):
        pass
    assert sqlstate in err, err
    return err


def ask(gw, sql: str):
    """A fresh client's one-value query (as user and database postgres); a socket timeout
    (20 s) fails the test instead of a hang when its server never answers."""
    c = Raw(gw, "postgres", "postgres")
    try:
        rows = c.run(query(sql))
    finally:
        c.close()
    assert not any(t == b"E" for t, _ in rows), rows
    (row,) = [body for t, body in rows if t == b"D"]
    (n,) = struct.unpack("!i", row[2:6])
    return (int(row[6 : 6 + n]),)

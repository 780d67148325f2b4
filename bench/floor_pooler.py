#!/usr/bin/env python3
"""The floor: the least work a transaction pooler written in Python on uvloop can do.

    python bench/floor_pooler.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT USER DBNAME [POOL_SIZE]

NOT a pooler anyone should use. It exists to measure how fast the gateway's stack (Python 3 +
uvloop) can possibly be on this machine, so that ``pgbench_compare.py --floor`` can show which
part of the gap to PgBouncer is the gateway's own work and which part any Python data path pays.

What it does per request, and nothing more: a client's bytes are forwarded as they arrive to the
server it holds, or it takes an idle server (or queues for one); a server's bytes are forwarded
to its client, and when a read ends with ReadyForQuery 'I' the server goes to the next waiting
client. No message is parsed, nothing is checked, no state is tracked: a client may only send
one request (a Query, or a batch ending with Sync) and wait for its answer, as pgbench does.
Clients are accepted without authentication (trust); upstream logins must be trust as well
(pgbench_compare.py --floor adds a pg_hba line for it). The pool is opened at start; a server
that closes is not replaced.
"""
from __future__ import annotations

import asyncio
import struct
import sys
from collections import deque

import uvloop

READY_IDLE = b"Z\x00\x00\x00\x05I"


def startup_packet(user: str, dbname: str) -> bytes:
    body = (struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0"
            + dbname.encode() + b"\0\0")
    return struct.pack("!I", len(body) + 4) + body


class Floor:
    def __init__(self) -> None:
        self.idle: list[Server] = []
        self.waiters: deque[Client] = deque()
        self.welcome = b""  # the first server's ParameterStatus messages, for every client

    def release(self, srv: "Server") -> None:
        waiters = self.waiters
        while waiters:
            c = waiters.popleft()
            if not c.closed:
                c.srv = srv
                srv.client = c
                c.flush()
                return
        self.idle.append(srv)


class Server(asyncio.Protocol):
    def __init__(self, floor: Floor, user: str, dbname: str, ready: asyncio.Future) -> None:
        self.floor = floor
        self.user, self.dbname = user, dbname
        self.ready = ready
        self.client: Client | None = None
        self.buf = b""
        self.t: asyncio.Transport | None = None

    def connection_made(self, t) -> None:
        self.t = t
        t.write(startup_packet(self.user, self.dbname))

    def data_received(self, d: bytes) -> None:
        c = self.client
        if c is not None:
            if d.endswith(READY_IDLE):
                c.srv = None
                self.client = None
                self.floor.release(self)
            c.t.write(d)
            return
        if self.ready.done():
            return
        self.buf += d
        if self.buf.endswith(READY_IDLE):
            if not self.floor.welcome:
                out, pos, b = [], 0, self.buf
                while pos + 5 <= len(b):
                    (n,) = struct.unpack_from("!I", b, pos + 1)
                    if b[pos:pos + 1] == b"S":
                        out.append(b[pos:pos + 1 + n])
                    pos += 1 + n
                self.floor.welcome = b"".join(out)
            self.buf = b""
            self.ready.set_result(None)
        elif self.buf[:1] == b"E" or (self.buf[:1] == b"R" and self.buf[5:9] != b"\0\0\0\0"):
            self.ready.set_exception(RuntimeError(f"upstream login failed (trust needed): {self.buf[:200]!r}"))

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"upstream connection lost: {exc}"))


class Client(asyncio.Protocol):
    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.started = False
        self.closed = False
        self.waiting = False
        self.buf = b""
        self.srv: Server | None = None
        self.t: asyncio.Transport | None = None

    def connection_made(self, t) -> None:
        self.t = t

    def data_received(self, d: bytes) -> None:
        if not self.started:
            self._startup(d)
            return
        srv = self.srv
        if srv is not None:
            srv.t.write(d)
            return
        self.buf += d
        if self.waiting:
            return
        if d[:1] == b"X":
            self.t.close()
            return
        idle = self.floor.idle
        if idle:
            srv = idle.pop()
            self.srv = srv
            srv.client = self
            self.flush()
        else:
            self.waiting = True
            self.floor.waiters.append(self)

    def flush(self) -> None:
        self.waiting = False
        b, self.buf = self.buf, b""
        if b[:1] == b"X":  # Terminate while waiting: the server stays free
            srv, self.srv = self.srv, None
            srv.client = None
            self.floor.release(srv)
            self.t.close()
            return
        self.srv.t.write(b)

    def _startup(self, d: bytes) -> None:
        self.buf += d
        while len(self.buf) >= 8:
            (n,) = struct.unpack_from("!I", self.buf)
            if len(self.buf) < n:
                return
            (code,) = struct.unpack_from("!I", self.buf, 4)
            self.buf = self.buf[n:]
            if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: no
                self.t.write(b"N")
                continue
            self.started = True
            self.t.write(b"R\0\0\0\x08\0\0\0\0" + self.floor.welcome
                         + b"K\0\0\0\x0c\0\0\0\1\0\0\0\2" + READY_IDLE)
            return

    def connection_lost(self, exc) -> None:
        self.closed = True
        srv, self.srv = self.srv, None
        if srv is not None:  # mid-request: a real pooler would clean up; the floor drops it
            srv.client = None
            srv.t.close()


async def main(argv: list[str]) -> None:
    port, host, uport, user, dbname = int(argv[0]), argv[1], int(argv[2]), argv[3], argv[4]
    size = int(argv[5]) if len(argv) > 5 else 8
    loop = asyncio.get_running_loop()
    floor = Floor()
    for _ in range(size):
        ready = loop.create_future()
        if host.startswith("/"):
            _, srv = await loop.create_unix_connection(
                lambda: Server(floor, user, dbname, ready), f"{host}/.s.PGSQL.{uport}")
        else:
            _, srv = await loop.create_connection(lambda: Server(floor, user, dbname, ready), host, uport)
        await ready
        floor.idle.append(srv)
    server = await loop.create_server(lambda: Client(floor), "127.0.0.1", port)
    print(f"floor pooler listening on 127.0.0.1:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) < 6:
        raise SystemExit(__doc__)
    uvloop.run(main(sys.argv[1:]))

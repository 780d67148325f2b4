"""Microbenchmark of the proxy loop's Python work for one transaction (simple: client Query ->
server RowDescription/DataRow/CommandComplete/ReadyForQuery; extended: Parse/Bind/Describe/
Execute/Sync -> their replies), with in-memory transports: no sockets, no event loop. First one
client on an idle server, then two clients taking turns on one server (the waiting path: what
most transactions take at 50 clients on a pool of 8). Run: python bench/hotpath_micro.py"""
import asyncio
import tempfile
import time
from pathlib import Path

from pooler.config import Config, DatabaseConfig
from pooler.gateway.app import Gateway
from pooler.gateway.session import C_READY, ClientSession
from pooler.gateway.server import S_IDLE, ServerConn
from pooler.protocol import messages as m


class T:
    def write(self, d):
        pass

    def is_closing(self):
        return False

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_extra_info(self, k, default=None):
        return None


def setup(mode="transaction", clients=1):
    # a config file path whose directory has no rules/: no policy, the pure pooling work
    cfg = Config(path=Path(tempfile.mkdtemp(prefix="hotpath-")) / "gateway.ini", pool_mode=mode, auth_type="trust")
    db = DatabaseConfig(name="db")
    gw = Gateway(cfg)
    pool = gw.get_pool(db, "u")
    pool.welcome = {}
    srv = ServerConn(pool)
    srv.transport = T()
    srv.state = S_IDLE
    pool.idle.append(srv)
    cs = []
    for _ in range(clients):
        c = ClientSession(gw)
        c.transport = T()
        c.state = C_READY
        c.pool = pool
        c.mode = mode
        c.rewrite = mode != "session"
        cs.append(c)
    return gw, pool, srv, cs


def main():
    gw, pool, srv, (c,) = setup()
    q = m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 42;")
    resp = (m.message(b"T", b"\x00\x01abalance\x00" + b"\x00" * 18) + m.message(b"D", b"\x00\x01\x00\x00\x00\x041234")
            + m.command_complete("SELECT 1") + m.ready_for_query())
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        c.data_received(q)
        srv.data_received(resp)
    dt = time.perf_counter() - t0
    print(f"simple-protocol transaction, gateway Python work: {dt / n * 1e6:.2f} us")
    # extended protocol: Parse/Bind/Describe/Execute/Sync unnamed
    ext = (m.parse(b"", b"SELECT abalance FROM pgbench_accounts WHERE aid = $1\x00\x00\x00")
           + m.message(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00")
           + m.message(b"D", b"P\x00") + m.message(b"E", b"\x00\x00\x00\x00\x00") + m.SYNC)
    eresp = (m.PARSE_COMPLETE + m.BIND_COMPLETE + m.message(b"T", b"\x00\x01abalance\x00" + b"\x00" * 18)
             + m.message(b"D", b"\x00\x01\x00\x00\x00\x041234") + m.command_complete("SELECT 1") + m.ready_for_query())
    t0 = time.perf_counter()
    for _ in range(n):
        c.data_received(ext)
        srv.data_received(eresp)
    dt = time.perf_counter() - t0
    print(f"extended-protocol transaction, gateway Python work: {dt / n * 1e6:.2f} us")
    waiting_path(q, resp, ext, eresp)


def waiting_path(q, resp, ext, eresp, n=100_000):
    """Two clients on one server (pool size 1): every request waits for the server and every
    reply hands the server to the other client, as at 50 clients on a pool of 8."""
    gw, pool, srv, (a, b) = setup(clients=2)
    pool.db.pool_size = 1
    for name, req, rep in (("simple", q, resp), ("extended", ext, eresp)):
        a.data_received(req)  # a holds the server
        b.data_received(req)  # b waits
        t0 = time.perf_counter()
        for _ in range(n // 2):
            srv.data_received(rep)  # a's reply: the server goes to b, b's request is sent
            a.data_received(req)  # a waits
            srv.data_received(rep)
            b.data_received(req)
        dt = time.perf_counter() - t0
        srv.data_received(rep)
        srv.data_received(rep)
        assert srv.client is None and not pool.waiters
        print(f"{name}-protocol transaction, waiting for a server, gateway Python work: {dt / n * 1e6:.2f} us")


if __name__ == "__main__":
    asyncio.run(asyncio.sleep(0))
    main()

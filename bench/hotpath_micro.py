"""Microbenchmark of the proxy loop's Python work for one transaction (simple: client Query ->
server RowDescription/DataRow/CommandComplete/ReadyForQuery; extended: Parse/Bind/Describe/
Execute/Sync -> their replies), with in-memory transports: no sockets, no event loop. First one
client on an idle server, then two clients taking turns on one server (the waiting path: what
most transactions take at 50 clients on a pool of 8).

Each case runs with the gateway's own observers subscribed (the session log and PgBouncer's
counters: what a running gateway pays) and with no observer at all (the core alone); the
best of several repeats is printed, which is steadier than a mean on a shared machine.

    python bench/hotpath_micro.py [--repeat 7]
    (cd OTHER_CHECKOUT && PYTHONPATH=. python bench/hotpath_micro.py)   # the same for another revision
"""
import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from pooler.config import Config, DatabaseConfig
from pooler.gateway.app import Gateway
from pooler.gateway.server import S_IDLE, ServerConn
from pooler.gateway.session import C_READY, ClientSession
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


def setup(mode="transaction", clients=1, observers=True):
    # a config file path whose directory has no rules/: no policy, the pure pooling work
    cfg = Config(path=Path(tempfile.mkdtemp(prefix="hotpath-")) / "gateway.ini", pool_mode=mode, auth_type="trust")
    db = DatabaseConfig(name="db")
    gw = Gateway(cfg)
    if not observers:
        for o in list(gw.events.observers):
            gw.events.unsubscribe(o)
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


Q = m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 42;")
RESP = (m.message(b"T", b"\x00\x01abalance\x00" + b"\x00" * 18) + m.message(b"D", b"\x00\x01\x00\x00\x00\x041234")
        + m.command_complete("SELECT 1") + m.ready_for_query())
EXT = (m.parse(b"", b"SELECT abalance FROM pgbench_accounts WHERE aid = $1\x00\x00\x00")
       + m.message(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00")
       + m.message(b"D", b"P\x00") + m.message(b"E", b"\x00\x00\x00\x00\x00") + m.SYNC)
ERESP = (m.PARSE_COMPLETE + m.BIND_COMPLETE + m.message(b"T", b"\x00\x01abalance\x00" + b"\x00" * 18)
         + m.message(b"D", b"\x00\x01\x00\x00\x00\x041234") + m.command_complete("SELECT 1") + m.ready_for_query())


def idle_path(req, rep, observers, repeat, n=100_000):
    gw, pool, srv, (c,) = setup(observers=observers)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            c.data_received(req)
            srv.data_received(rep)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def waiting_path(req, rep, observers, repeat, n=50_000):
    """Two clients on one server (pool size 1): every request waits for the server and every
    reply hands the server to the other client, as at 50 clients on a pool of 8."""
    gw, pool, srv, (a, b) = setup(clients=2, observers=observers)
    pool.db.pool_size = 1
    a.data_received(req)  # a holds the server
    b.data_received(req)  # b waits
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n // 2):
            srv.data_received(rep)  # a's reply: the server goes to b, b's request is sent
            a.data_received(req)  # a waits
            srv.data_received(rep)
            b.data_received(req)
        best = min(best, (time.perf_counter() - t0) / n)
    srv.data_received(rep)
    srv.data_received(rep)
    assert srv.client is None and not pool.waiters
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7, help="repeats per case; the best is printed (default 7)")
    args = ap.parse_args()
    print("gateway Python work per transaction, microseconds (best of %d)" % args.repeat)
    print(f"{'case':52} {'observers':>10} {'none':>8}")
    for name, req, rep in (("simple", Q, RESP), ("extended", EXT, ERESP)):
        for path, fn in (("idle server", idle_path), ("waiting for a server", waiting_path)):
            with_obs = fn(req, rep, True, args.repeat)
            without = fn(req, rep, False, args.repeat)
            print(f"{name + '-protocol transaction, ' + path:52} {with_obs:10.2f} {without:8.2f}")


if __name__ == "__main__":
    asyncio.run(asyncio.sleep(0))
    main()

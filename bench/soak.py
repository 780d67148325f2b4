#!/usr/bin/env python3
"""Soak: many clients on few servers for a while, then faults under that load. Prints figures.

    .venv/bin/python bench/soak.py                      # 1,000 clients, 10 servers, 60 s, faults, 10,000 idle
    .venv/bin/python bench/soak.py --quick              # 200 clients, 10 s, 2,000 idle, short faults
    .venv/bin/python bench/soak.py --clients 500 --seconds 30 --idle 0 --no-faults

Starts a throwaway PostgreSQL (pooler.pgcluster.PgCluster, ``synchronous_commit = on`` so that a
kill -9 cannot lose a commit the client was told about) and the gateway (``python -m pooler run``,
transaction pooling, ``default_pool_size = --servers``, no rules). Then:

1. **steady load**: ``--clients`` asyncpg connections (one process) for ``--seconds``, each
   looping over a mix, with ``--think`` seconds (random, up to) between operations: reads
   (``fetchrow`` by primary key: asyncpg's named prepared statements), writes (a transaction:
   UPDATE of a row + INSERT of a log row, COMMIT), explicitly prepared statements
   (``conn.prepare`` then three executions), cancels (``pg_sleep(2)`` with a 0.1 s timeout:
   asyncpg sends a CancelRequest) and abrupt disconnects (``terminate()`` in the middle of a
   transaction holding a row lock, then a new connection). Cancels and disconnects are the
   provoked errors; any other error is counted as unexpected.
2. **faults**, with the same load running, one after another: a server that stops answering
   (SIGSTOP on one of the gateway's backends for ``--stop-seconds``, then SIGCONT); a slow
   consumer (a raw socket asks for a ~``--slow-mb`` MB result and reads nothing for
   ``--slow-seconds``, then closes); PostgreSQL restarted (fast shutdown, start); PostgreSQL
   killed -9 (the postmaster and its backends, then started: crash recovery). For each: the
   other clients' operations per second during the fault vs. before it, the errors it caused,
   the time until every client has succeeded again, the gateway's RSS.
3. **leaks and losses**, once the load has stopped: transactions open and locks held on
   PostgreSQL (pg_stat_activity, pg_locks; must be 0), and every write a client was told had
   committed is in the table (the log rows; the counters' sum equals the log's row count).
4. **idle clients**: ``--idle`` raw connections log in and stay idle; the gateway's RSS before
   and after (per client), and one query's round trip while they are there.

The gateway's RSS is sampled every 0.2 s (/proc/PID/status), its CPU time from /proc/PID/stat.
The file descriptor limit is raised to the hard limit (both processes inherit it).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import resource
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402

from pooler.pgcluster import PgCluster  # noqa: E402
from pooler.protocol import messages as m  # noqa: E402
from tests.gwproc import GatewayProc  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROWS = 10_000
OPS = ("read", "write", "prepared", "cancel", "disconnect")
WEIGHTS = (60, 25, 10, 3, 2)


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def classify(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:90]}"


@dataclass
class Window:
    """A stretch of the run: operations and errors counted while it lasts."""
    name: str
    start: float
    end: float = 0.0
    ops: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    rss_peak: float = 0.0
    recovered_at: float = 0.0
    extra: dict = field(default_factory=dict)


class Load:
    def __init__(self, dsn: dict, clients: int, think: float) -> None:
        self.dsn = dsn
        self.clients = clients
        self.think = think
        self.stop = False
        self.ops = collections.Counter()  # by kind, successful
        self.provoked = collections.Counter()  # by kind: cancels and disconnects as asked
        self.unexpected = collections.Counter()  # errors outside every fault window
        self.fault_errors = collections.Counter()
        self.acked_commits = 0
        self.uncertain_commits = 0  # COMMIT sent, no answer (the server died under it)
        self.window: Window | None = None
        self.last_ok = [0.0] * clients
        self.latencies: list[float] = []
        self.connected = 0
        self.seq = [0] * clients

    async def connect(self, i: int) -> asyncpg.Connection:
        delay = 0.05
        while True:
            try:
                conn = await asyncpg.connect(**self.dsn, timeout=30)
                self.connected += not self.last_ok[i]
                self.last_ok[i] = self.last_ok[i] or time.monotonic()
                return conn
            except Exception as e:  # noqa: BLE001 - counted, then retried
                self.error(e)
                if self.stop:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def error(self, e: BaseException, kind: str = "connect") -> None:
        what = f"{kind}: {classify(e)}"
        if self.window is not None:
            self.window.errors[what] += 1
            self.fault_errors[what] += 1
        else:
            self.unexpected[what] += 1

    def ok(self, i: int, kind: str, t0: float) -> None:
        now = time.monotonic()
        self.ops[kind] += 1
        self.last_ok[i] = now
        if self.window is not None:
            self.window.ops += 1
        if len(self.latencies) < 200_000:
            self.latencies.append(now - t0)

    async def worker(self, i: int) -> None:
        rnd = random.Random(i)
        await asyncio.sleep(rnd.random() * 2)  # logins spread over two seconds
        conn = await self.connect(i)
        try:
            while not self.stop:
                await asyncio.sleep(rnd.random() * self.think)
                kind = rnd.choices(OPS, WEIGHTS)[0]
                t0 = time.monotonic()
                try:
                    if kind == "read":
                        row = await conn.fetchrow("SELECT id, n FROM soak WHERE id = $1", rnd.randrange(ROWS))
                        assert row is not None
                    elif kind == "write":
                        self.seq[i] += 1
                        seq = self.seq[i]
                        async with conn.transaction():
                            await conn.execute("UPDATE soak SET n = n + 1 WHERE id = $1", rnd.randrange(ROWS))
                            await conn.execute("INSERT INTO soak_log VALUES ($1, $2)", i, seq)
                            self.uncertain_commits += 1  # until COMMIT answers
                        self.uncertain_commits -= 1
                        self.acked_commits += 1
                    elif kind == "prepared":
                        st = await conn.prepare("SELECT count(*) FROM soak WHERE id BETWEEN $1 AND $1 + 10")
                        for _ in range(3):
                            await st.fetchval(rnd.randrange(ROWS))
                    elif kind == "cancel":
                        try:
                            await conn.execute("SELECT pg_sleep(2)", timeout=0.1)
                        except asyncio.TimeoutError:
                            self.provoked["cancel"] += 1
                            continue
                    elif kind == "disconnect":
                        tx = conn.transaction()
                        await tx.start()
                        await conn.execute("UPDATE soak SET n = n WHERE id = $1", rnd.randrange(ROWS))
                        conn.terminate()  # the socket closes mid-transaction, row lock held
                        self.provoked["disconnect"] += 1
                        conn = await self.connect(i)
                        continue
                    self.ok(i, kind, t0)
                except Exception as e:  # noqa: BLE001 - counted
                    self.error(e, kind)
                    if kind in ("write", "disconnect") and not conn.is_closed() and not conn.is_in_transaction():
                        # asyncpg keeps its transaction marker when BEGIN itself fails on a
                        # connection that stays open (every later transaction() would send
                        # SAVEPOINT and fail): start over on a new connection, as an
                        # application's pool would
                        conn.terminate()
                    if conn.is_closed():
                        conn = await self.connect(i)
        finally:
            if not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 10)
                except Exception:  # noqa: BLE001
                    conn.terminate()


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self.samples: list[tuple[float, float]] = []
        self.load: Load | None = None

    async def run(self) -> None:
        while True:
            try:
                r = rss_mb(self.pid)
            except OSError:
                return
            self.peak = max(self.peak, r)
            self.samples.append((time.monotonic(), r))
            if self.load is not None and self.load.window is not None:
                self.load.window.rss_peak = max(self.load.window.rss_peak, r)
            await asyncio.sleep(0.2)


async def direct(pg: PgCluster) -> asyncpg.Connection:
    return await asyncpg.connect(host=pg.host, port=pg.port, user=pg.superuser, password=pg.password,
                                 database="soak")


async def gateway_backends(pg: PgCluster) -> list[int]:
    c = await direct(pg)
    try:
        rows = await c.fetch("SELECT pid FROM pg_stat_activity WHERE datname = 'soak' AND pid <> pg_backend_pid() "
                             "AND backend_type = 'client backend' ORDER BY pid")
        return [r["pid"] for r in rows]
    finally:
        await c.close()


async def wait_recovered(load: Load, since: float, timeout: float) -> float:
    """Seconds after ``since`` until every client has succeeded once more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if min(load.last_ok) > since:
            return time.monotonic() - since
        await asyncio.sleep(0.1)
    return float("nan")


async def fault_window(load: Load, name: str, act, settle: float, recover_timeout: float = 60.0) -> Window:
    """Measure ``settle`` s before, run ``act`` (a coroutine), then until every client recovered."""
    before_ops = sum(load.ops.values())
    t0 = time.monotonic()
    await asyncio.sleep(settle)
    rate_before = (sum(load.ops.values()) - before_ops) / (time.monotonic() - t0)
    w = Window(name, time.monotonic())
    load.window = w
    log(f"fault: {name}")
    w.extra = await act() or {}
    acted = time.monotonic()
    w.extra["rate_before"] = rate_before
    w.extra["rate_during"] = w.ops / max(acted - w.start, 1e-6)
    w.recovered_at = await wait_recovered(load, acted, recover_timeout)
    w.end = time.monotonic()
    load.window = None
    return w


async def stop_a_backend(pg: PgCluster, load: Load, seconds: float) -> dict:
    pids = await gateway_backends(pg)
    victim = pids[len(pids) // 2]
    os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    ops0 = load.window.ops
    await asyncio.sleep(seconds)
    ops_stopped = load.window.ops - ops0
    os.kill(victim, signal.SIGCONT)
    return {"backend": victim, "stopped_s": time.monotonic() - t0,
            "rate_while_stopped": ops_stopped / seconds}


async def slow_consumer(gw: GatewayProc, gw_pid: int, load: Load, mb: int, seconds: float) -> dict:
    """A client that asks for a large result and reads nothing, then goes away."""
    reader, writer = await asyncio.open_connection(gw.host, gw.port, limit=1 << 16)
    writer.write(m.startup_message({"user": "postgres", "database": "soak"}))
    buf = b""
    while b"Z\x00\x00\x00\x05" not in buf:
        buf += await reader.read(65536)
    rows = mb * 1000  # 1 KB per row
    rss0 = rss_mb(gw_pid)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    transport = writer.transport
    transport.pause_reading()  # read nothing from now on
    writer.write(m.query(f"SELECT repeat('x', 1000) FROM generate_series(1, {rows})"))
    ops0 = load.window.ops
    peak = rss0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(0.2)
        peak = max(peak, rss_mb(gw_pid))
    ops_during = load.window.ops - ops0
    transport.abort()  # goes away without reading: the server is cancelled or closed by the gateway
    return {"result_mb": rows * 1000 / 1e6, "rss_before": rss0, "rss_peak": peak,
            "rate_while_stalled": ops_during / seconds}


async def restart_pg(pg: PgCluster) -> dict:
    t0 = time.monotonic()
    await asyncio.to_thread(pg.restart)
    return {"down_s": time.monotonic() - t0}


async def kill9_pg(pg: PgCluster) -> dict:
    t0 = time.monotonic()
    pid = pg.pid
    children = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    os.kill(pid, signal.SIGKILL)
    for c in children:
        try:
            os.kill(c, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in range(100):  # every process of the cluster gone before the start (shared memory)
        if not any(os.path.exists(f"/proc/{p}") for p in [pid, *children]):
            break
        await asyncio.sleep(0.05)
    await asyncio.to_thread(pg.start_server)
    return {"down_s": time.monotonic() - t0, "killed": 1 + len(children)}


async def leaks(pg: PgCluster) -> dict:
    c = await direct(pg)
    try:
        deadline = time.monotonic() + 10
        while True:  # the gateway finishes resetting servers of clients that just left
            open_tx = await c.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND xact_start IS NOT NULL "
                "AND backend_type = 'client backend'")
            locks = await c.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE pid <> pg_backend_pid() "
                "AND a.backend_type = 'client backend'")
            if (open_tx == 0 and locks == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        logged = await c.fetchval("SELECT count(*) FROM soak_log")
        total = await c.fetchval("SELECT sum(n) FROM soak")
        return {"open_transactions": open_tx, "locks": locks, "log_rows": logged, "counter_sum": total}
    finally:
        await c.close()


async def idle_clients(gw: GatewayProc, gw_pid: int, n: int) -> dict:
    rss0 = rss_mb(gw_pid)
    conns: list[asyncio.StreamWriter] = []
    startup = m.startup_message({"user": "postgres", "database": "soak"})
    failed = collections.Counter()
    t0 = time.monotonic()

    async def one() -> None:
        try:
            r, w = await asyncio.open_connection(gw.host, gw.port)
            w.write(startup)
            buf = b""
            while not buf.endswith(b"Z\x00\x00\x00\x05I"):
                chunk = await r.read(4096)
                if not chunk:
                    raise ConnectionError(f"closed during login: {buf[-200:]!r}")
                buf += chunk
            conns.append(w)
        except Exception as e:  # noqa: BLE001
            failed[classify(e)] += 1

    batch = 500
    for k in range(0, n, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, n - k))))
    login_s = time.monotonic() - t0
    await asyncio.sleep(1)
    rss1 = rss_mb(gw_pid)
    q = await asyncpg.connect(host=gw.host, port=gw.port, user="postgres", database="soak")
    t1 = time.monotonic()
    for _ in range(100):
        await q.fetchval("SELECT 1")
    rtt_ms = (time.monotonic() - t1) * 10
    await q.close()
    for w in conns:
        w.write(m.TERMINATE)
        w.close()
    return {"clients": len(conns), "failed": dict(failed), "login_s": login_s, "rss_before": rss0,
            "rss_after": rss1, "kb_per_client": (rss1 - rss0) * 1024 / max(len(conns), 1), "select1_ms": rtt_ms}


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def main_async(args) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = max(args.clients, args.idle) + 200
    if hard < need:
        log(f"fd limit {hard} < {need}: fewer clients may connect")
    pg = PgCluster()
    pg.extra_settings.update({"synchronous_commit": "on", "max_connections": "100"})
    pg.start()
    work = Path(tempfile.mkdtemp(prefix="pooler-soak-"))
    gw = None
    try:
        c = await asyncpg.connect(host=pg.host, port=pg.port, user=pg.superuser, password=pg.password,
                                  database="postgres")
        await c.execute("CREATE DATABASE soak")
        await c.close()
        c = await direct(pg)
        await c.execute("CREATE TABLE soak (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);"
                        f"INSERT INTO soak SELECT g FROM generate_series(0, {ROWS - 1}) g;"
                        "CREATE TABLE soak_log (worker int, seq int, PRIMARY KEY (worker, seq))")
        await c.close()
        (work / "rules").mkdir()
        gw = GatewayProc({"soak": f"host={pg.host} port={pg.port} dbname=soak user={pg.superuser} "
                                  f"password={pg.password}"}, settings={
            "default_pool_size": args.servers, "max_client_conn": need + 100, "rules_dir": str(work / "rules"),
            "log_connections": 0, "log_disconnections": 0, "query_wait_timeout": 120,
            "server_login_retry": 1, "admin_users": "admin",
        }, workdir=str(work))
        gw.start()
        gw_pid = gw.proc.pid
        log(f"PostgreSQL {pg.port}, gateway {gw.port} (pid {gw_pid}), {args.clients} clients on {args.servers} servers")
        sampler = Sampler(gw_pid)
        st = asyncio.get_running_loop().create_task(sampler.run())
        load = Load({"host": gw.host, "port": gw.port, "user": "postgres", "database": "soak"},
                    args.clients, args.think)
        sampler.load = load
        rss_start = rss_mb(gw_pid)
        workers = [asyncio.get_running_loop().create_task(load.worker(i)) for i in range(args.clients)]
        cpu0, t0 = cpu_s(gw_pid), time.monotonic()
        while load.connected < args.clients and time.monotonic() - t0 < 120:
            await asyncio.sleep(0.1)
        log(f"{load.connected} clients connected in {time.monotonic() - t0:.1f} s; steady load for {args.seconds} s")
        ops0 = sum(load.ops.values())
        t1, cpu1, me1 = time.monotonic(), cpu_s(gw_pid), own_cpu()
        await asyncio.sleep(args.seconds)
        steady_s = time.monotonic() - t1
        steady_ops = sum(load.ops.values()) - ops0
        steady_cpu = cpu_s(gw_pid) - cpu1
        steady_me = own_cpu() - me1
        lat_steady = list(load.latencies)
        steady_rss = sampler.peak
        steady_unexpected = dict(load.unexpected)
        steady_provoked = dict(load.provoked)
        windows: list[Window] = []
        if not args.no_faults:
            windows.append(await fault_window(load, f"SIGSTOP on a backend for {args.stop_seconds:g} s",
                                              lambda: stop_a_backend(pg, load, args.stop_seconds), 2.0))
            windows.append(await fault_window(load, f"slow consumer ({args.slow_mb} MB result, reads nothing "
                                                    f"for {args.slow_seconds:g} s)",
                                              lambda: slow_consumer(gw, gw_pid, load, args.slow_mb, args.slow_seconds), 2.0))
            windows.append(await fault_window(load, "PostgreSQL restarted (fast)", lambda: restart_pg(pg), 2.0))
            windows.append(await fault_window(load, "PostgreSQL killed -9 (postmaster and backends)",
                                              lambda: kill9_pg(pg), 2.0))
            await asyncio.sleep(2.0)
        load.stop = True
        await asyncio.gather(*workers, return_exceptions=True)
        total_s, total_cpu = time.monotonic() - t0, cpu_s(gw_pid) - cpu0
        leak = await leaks(pg)
        idle = await idle_clients(gw, gw_pid, args.idle) if args.idle else None
        st.cancel()
        alive = gw.proc.poll() is None

        print(f"\n## soak: {args.clients} clients on {args.servers} servers, think <= {args.think:g} s "
              f"(mix: {', '.join(f'{k} {w}%' for k, w in zip(OPS, WEIGHTS))})\n")
        print(f"steady {steady_s:.0f} s: {steady_ops} operations ({steady_ops / steady_s:.0f}/s), "
              f"latency p50 {pct(lat_steady, .5) * 1000:.1f} ms, p99 {pct(lat_steady, .99) * 1000:.1f} ms "
              f"(the load generator used {100 * steady_me / steady_s:.0f}% of a core)")
        print(f"  provoked: {steady_provoked.get('cancel', 0)} cancels, {steady_provoked.get('disconnect', 0)} "
              f"abrupt disconnects; unexpected errors: {sum(steady_unexpected.values())}")
        for k, v in sorted(steady_unexpected.items(), key=lambda kv: -kv[1])[:10]:
            print(f"    {v} x {k}")
        print(f"  gateway: RSS {rss_start:.0f} MB at start, peak {steady_rss:.0f} MB; CPU {steady_cpu:.1f} s "
              f"({100 * steady_cpu / steady_s:.0f}% of a core, {1e6 * steady_cpu / max(steady_ops, 1):.0f} us per operation)")
        for w in windows:
            print(f"\nfault: {w.name}")
            ex = w.extra
            print(f"  others' operations/s: before {ex['rate_before']:.0f}, during {ex['rate_during']:.0f}"
                  + "".join(f", {k.replace('_', ' ')} {v:.0f}" for k, v in ex.items() if k.startswith("rate_")
                            and k not in ("rate_before", "rate_during")))
            print(f"  every client served again {w.recovered_at:.1f} s after; gateway RSS peak {w.rss_peak:.0f} MB")
            more = {k: v for k, v in ex.items() if not k.startswith("rate_")}
            if more:
                print("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in more.items()))
            print(f"  errors it caused: {sum(w.errors.values())}")
            for k, v in sorted(w.errors.items(), key=lambda kv: -kv[1])[:6]:
                print(f"    {v} x {k}")
        after = {k: v - steady_unexpected.get(k, 0) for k, v in load.unexpected.items()
                 if v - steady_unexpected.get(k, 0)}
        print(f"\nafter the faults, outside their windows: {sum(after.values())} unexpected errors")
        for k, v in sorted(after.items(), key=lambda kv: -kv[1])[:10]:
            print(f"    {v} x {k}")
        print(f"whole run {total_s:.0f} s: {sum(load.ops.values())} operations, gateway CPU {total_cpu:.1f} s, "
              f"RSS peak {sampler.peak:.0f} MB, gateway {'alive' if alive else 'DEAD'}")
        print(f"leaks: {leak['open_transactions']} open transactions, {leak['locks']} locks on PostgreSQL")
        lost = load.acked_commits - leak["log_rows"]
        print(f"writes: {load.acked_commits} commits acknowledged, {load.uncertain_commits} without an answer "
              f"(server died under the COMMIT); {leak['log_rows']} log rows, counters sum {leak['counter_sum']} "
              f"-> {'nothing lost' if lost <= 0 and leak['log_rows'] <= load.acked_commits + load.uncertain_commits else f'{lost} LOST'}"
              f"{'' if leak['counter_sum'] == leak['log_rows'] else ' (counter sum differs: NOT ATOMIC)'}")
        if idle:
            print(f"\nidle: {idle['clients']} clients logged in in {idle['login_s']:.1f} s "
                  f"({idle['clients'] / idle['login_s']:.0f}/s); gateway RSS {idle['rss_before']:.0f} -> "
                  f"{idle['rss_after']:.0f} MB ({idle['kb_per_client']:.1f} KB per client); SELECT 1 "
                  f"{idle['select1_ms']:.2f} ms meanwhile" + (f"; failed: {idle['failed']}" if idle["failed"] else ""))
        return 0 if alive else 1
    finally:
        if gw is not None:
            gw.stop()
        pg.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--servers", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--think", type=float, default=1.0, help="each client waits up to this long between operations")
    ap.add_argument("--idle", type=int, default=10_000, help="idle clients to hold at the end (0: skip)")
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--stop-seconds", type=float, default=5)
    ap.add_argument("--slow-mb", type=int, default=200)
    ap.add_argument("--slow-seconds", type=float, default=8)
    ap.add_argument("--quick", action="store_true", help="200 clients, 10 s, 2,000 idle, short faults")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.seconds, args.idle = min(args.clients, 200), min(args.seconds, 10), min(args.idle, 2000)
        args.stop_seconds, args.slow_mb, args.slow_seconds = 2, 50, 3
    import uvloop  # the load generator's own CPU matters at 1,000 clients in one process
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

"""What recording sessions costs: pgbench -S at 50 clients through a gateway recording every
session (record_dir set, record_results = 5; its writer a child process, and a thread for
comparison) and one that does not, in the same run, rounds alternating, so machine noise hits
all alike; the ratio (aim: >= 0.95 x), CPU per transaction of each gateway process and,
separately, of its writer process, and records/bytes written per transaction. Then the writer's own cost
per record, measured in this process: the loop's part (building and encoding a record, the
hand-over in chunks) and the thread's part (sealing into the hash chain and writing). Not a test:
figures for bench/README.md.

    .venv/bin/python bench/record_overhead.py [--seconds 8] [--rounds 3] [--clients 50] [--pool-size 8]
        [--before OTHER_CHECKOUT]   # also that checkout's gateway, recording, in the same rounds
        [--tap-floor]               # also bench/tap_floor.py: the loop's cost of copying the streams out
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.pgbench_compare import CLK_TCK, Target, _proc_stat, clean_env, log, pgbench_bin, run_pgbench  # noqa: E402
from pooler.pgcluster import PgCluster, find_pg_bindir  # noqa: E402
from tests.gwproc import GatewayProc  # noqa: E402


def split_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of process ``pid`` itself, all its threads; of its live child processes: the
    writer process), so that the writer's work is neither hidden nor taken for the gateway's."""
    own = _proc_stat(pid)
    kids = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None and st[0] == pid:
                kids += st[1]
    return (own[1] if own else 0) / CLK_TCK, kids / CLK_TCK


def writer_cost(n: int = 200_000) -> tuple[float, float, float]:
    """(loop us/record, thread us/record, bytes/record) for ``n`` typical records, as CPU time
    of the thread doing the work (steadier than wall time on a shared machine)."""
    import shutil

    import orjson

    from pooler.recording.format import json_default
    from pooler.recording.writer import Writer

    d = Path(tempfile.mkdtemp(prefix="pooler-bench-writer-"))
    sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"
    nl = orjson.OPT_APPEND_NEWLINE
    chunks: list[bytes] = []
    buf = bytearray()
    t0 = time.thread_time()
    for k in range(n):  # what the recorder does on the loop for a stmt, rows, done sequence
        if k % 3 == 0:
            rec = {"t": "stmt", "ts": time.time(), "sid": "0abc1234.17", "i": k, "q": k // 3, "kind": "Q",
                   "route": "simple", "sql": sql, "action": None, "rule": "", "reason": "", "masks": []}
        elif k % 3 == 1:
            rec = {"t": "rows", "ts": time.time(), "sid": "0abc1234.17", "i": k, "q": k // 3,
                   "rows": [["-2763"]], "truncated": False, "row_bytes": 5}
        else:
            rec = {"t": "done", "ts": time.time(), "sid": "0abc1234.17", "i": k, "q": k // 3,
                   "tag": "SELECT 1", "rows": 1, "bytes": 76, "dur": 0.000231}
        buf += orjson.dumps(rec, default=json_default, option=nl)
        if (k + 1) % 1000 == 0:
            chunks.append(bytes(buf))
            buf = bytearray()
    loop_us = (time.thread_time() - t0) / n * 1e6
    # the thread's part: seal into the chain, write (to a real file), on this thread
    w = Writer(d, gateway="bench", rotate_size=1 << 30, rotate_age=0, compression="gzip", fsync=1.0)
    w.root.mkdir(exist_ok=True)
    t1 = time.thread_time()
    for c in chunks:
        w._write(c)
    thread_us = (time.thread_time() - t1) / (len(chunks) * 1000) * 1e6
    per = w.bytes / (len(chunks) * 1000)
    shutil.rmtree(d)
    return loop_us, thread_us, per


def inprocess_cost(n: int = 60_000, repeat: int = 3) -> dict[str, float]:
    """CPU per simple-protocol transaction in this process, with bench/hotpath_micro.py's
    in-memory transports (no sockets, no PostgreSQL): recording off, on with record_results = 5
    (writer process: this process's CPU, and the writer process's apart; writer thread: both in
    this process), on with 0. Best of ``repeat``."""
    import asyncio

    from bench.hotpath_micro import Q, RESP, setup
    from pooler.gateway.recorder import Recorder

    def one(record: bool, rows: int, writer: str = "process") -> tuple[float, float]:
        async def main() -> tuple[float, float]:
            gw, pool, srv, (c,) = setup(observers=True)
            r = None
            child = 0.0
            if record:
                gw.config.record_dir = tempfile.mkdtemp(prefix="pooler-bench-inproc-")
                gw.config.record_results = rows
                gw.config.record_writer = writer
                r = gw.recorder = Recorder(gw)
                gw.events.subscribe(r)
                r.start()
                c.addr, c.console = "127.0.0.1:1", False
                r.login(c)
            pid = getattr(r.writer, "pid", None) if r is not None else None
            c0 = _proc_stat(pid)[1] / CLK_TCK if pid else 0.0
            t0 = time.process_time()
            for k in range(n):
                c.data_received(Q)
                srv.data_received(RESP)
                if k % 256 == 0:
                    await asyncio.sleep(0)  # the recorder's 100 ms tick runs on this loop
            if r is not None:
                r._flush()
                while r.writer.queued:
                    await asyncio.sleep(0.001)
                    if pid:
                        r.writer.poll()
            cpu = (time.process_time() - t0) / n * 1e6
            if pid:
                child = (_proc_stat(pid)[1] / CLK_TCK - c0) / n * 1e6
            if r is not None:
                r.stop()
                import shutil

                shutil.rmtree(gw.config.record_dir)
            return cpu, child
        return asyncio.run(main())

    out = {}
    for name, record, rows, writer in (("off", False, 0, ""), ("on", True, 5, "process"),
                                       ("on, thread", True, 5, "thread"), ("on, no rows", True, 0, "process")):
        out[name] = min((one(record, rows, writer) for _ in range(repeat)), key=sum)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--pool-size", type=int, default=8)
    ap.add_argument("--before", metavar="DIR", help="another checkout (git worktree) whose gateway also records, "
                    "in the same rounds: before/after a change on the same machine minutes")
    ap.add_argument("--tap-floor", action="store_true", help="also bench/tap_floor.py's gateway: the loop only "
                    "copies each session's streams to a child process (the floor of building records there)")
    args = ap.parse_args()
    bindir = find_pg_bindir()
    pgbench = pgbench_bin(bindir)
    tmp = Path(tempfile.mkdtemp(prefix="pooler-bench-record-"))
    os.chmod(tmp, 0o755)
    pg = PgCluster()
    gws: list[GatewayProc] = []
    try:
        pg.start()
        pg.execute("CREATE DATABASE bench")
        subprocess.run([pgbench, "-i", "-q", "-s", "10", "-h", pg.host, "-p", str(pg.port), "-U", pg.superuser,
                        "bench"], check=True, capture_output=True, env=clean_env(PGPASSWORD=pg.password))
        db = f"host={pg.host} port={pg.port} dbname=bench user={pg.superuser} password={pg.password}"
        common = {"pool_mode": "transaction", "default_pool_size": args.pool_size, "max_client_conn": 500,
                  "log_connections": 0, "log_disconnections": 0}
        rec_dir = tmp / "recordings"
        targets = []
        for name, extra in (("recording off", {}), ("recording on", {"record_dir": str(rec_dir), "record_writer": "process"}),
                            ("on, thread", {"record_dir": str(tmp / "recordings-thread"), "record_writer": "thread"}),
                            ("on, no rows", {"record_dir": str(tmp / "recordings-norows"), "record_results": 0,
                                             "record_writer": "process"}),
                            *((("before: on", {"record_dir": str(tmp / "recordings-before"), "record_writer": "process"}),
                               ("before: thread", {"record_dir": str(tmp / "recordings-before-thread"),
                                                   "record_writer": "thread"})) if args.before else ()),
                            *((("tap floor", {"record_dir": str(tmp / "recordings-tap"), "record_writer": "process"}),)
                              if args.tap_floor else ())):
            wd = tmp / name.replace(" ", "-").replace(":", "")
            wd.mkdir()
            g = GatewayProc({"bench": db}, settings={**common, **extra}, workdir=str(wd),
                            repo=args.before if name.startswith("before") else None,
                            module="bench.tap_floor" if name == "tap floor" else "pooler")
            g.start()
            gws.append(g)
            targets.append(Target(name, g.host, g.port, cpu_pid=g.proc.pid, proc=g))
        tps: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu: dict[str, list[float]] = {t.name: [] for t in targets}
        wcpu: dict[str, list[float]] = {t.name: [] for t in targets}  # the writer process's
        xacts_on = 0
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else targets[::-1]  # each target first and last in turn
            for t in order:
                c0, w0 = split_cpu(t.cpu_pid)
                got, n, out = run_pgbench(pgbench, t, "simple", args.clients, 2, args.seconds)
                if got != got:
                    raise RuntimeError(f"pgbench failed against {t.name}:\n{out}")
                c1, w1 = split_cpu(t.cpu_pid)
                cpu[t.name].append((c1 - c0) / n * 1e6)
                wcpu[t.name].append((w1 - w0) / n * 1e6)
                tps[t.name].append(got)
                if t.name == "recording on":
                    xacts_on += n
                log(f"round {rnd + 1}: {t.name}: {got:.0f} tps")
        for g in gws[1:]:
            g.stop()  # closes (and compresses) the last file
        from pooler.recording.files import list_files
        from pooler.recording.verify import verify

        files = list_files(rec_dir)
        rep = verify(rec_dir)
        off, on, thread, norows = (statistics.median(tps[t.name]) for t in targets[:4])
        print(f"\npgbench -S -c {args.clients}, transaction pooling, pool {args.pool_size}, "
              f"{args.rounds} x {args.seconds:.0f} s per case, alternating")
        for t in targets:
            print(f"  {t.name:<14} median {statistics.median(tps[t.name]):8.0f} tps   "
                  f"gateway CPU {statistics.median(cpu[t.name]):5.1f} us/xact   "
                  f"writer process CPU {statistics.median(wcpu[t.name]):5.1f} us/xact   "
                  f"rounds: {', '.join(f'{x:.0f}' for x in tps[t.name])}")
        print(f"  recording on / off: {on / off:.3f} x   (writer thread: {thread / off:.3f} x; "
              f"record_results = 0: {norows / off:.3f} x)")
        if args.before:
            b_on, b_thread = (statistics.median(tps[t.name]) for t in targets[4:6])
            print(f"  before ({args.before}) / off: {b_on / off:.3f} x   (writer thread: {b_thread / off:.3f} x)")
        if args.tap_floor:
            print(f"  tap floor / off: {statistics.median(tps['tap floor']) / off:.3f} x   (the loop copying its "
                  "streams to a child process, per-statement records not built: bench/tap_floor.py)")
        print(f"  written: {rep.records} records in {len(files)} file(s), {rep.records / max(xacts_on, 1):.2f} "
              f"records/xact, {sum(f.size for f in files) / max(xacts_on, 1):.1f} compressed bytes/xact; "
              f"verify: {'ok' if rep.ok else rep.problems[:2]}")
        ip = inprocess_cost()
        print(f"  in-process CPU per transaction (no sockets): off {ip['off'][0]:.1f} us; on {ip['on'][0]:.1f} us "
              f"+ {ip['on'][1]:.1f} us in the writer process; on with the writer thread {ip['on, thread'][0]:.1f} us "
              f"(loop + thread); on with record_results = 0 {ip['on, no rows'][0]:.1f} us "
              f"+ {ip['on, no rows'][1]:.1f} us")
        loop_us, thread_us, per = writer_cost()
        print(f"  per record (CPU): {loop_us:.2f} us on the loop (dict + orjson into the chunk buffer), "
              f"{thread_us:.2f} us in the writer thread (hash chain, write), {per:.0f} bytes "
              "before compression")
        return 0
    finally:
        for g in gws:
            g.stop()
        pg.stop()


if __name__ == "__main__":
    raise SystemExit(main())

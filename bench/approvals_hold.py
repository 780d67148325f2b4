"""Does a statement waiting for approval slow anyone else down? pgbench -S at 50 clients on a pool
of 8, through one gateway with the shipped rules, alternating rounds with nothing held and with 5
statements held for approval (psql sessions whose UPDATE without WHERE waits for a reviewer).
Prints TPS per round and the ratio held / not held. Not a test: figures for bench/README.md.

    .venv/bin/python bench/approvals_hold.py [--seconds 8] [--rounds 3] [--clients 50] [--held 5]
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

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.pgbench_compare import Target, clean_env, log, pgbench_bin, run_pgbench  # noqa: E402
from pooler.pgcluster import PgCluster, find_pg_bindir  # noqa: E402
from tests.gwproc import GatewayProc  # noqa: E402


def pending(gw) -> list[str]:
    with psycopg.connect(gw.dsn(user="reviewer", dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as c:
        cur = c.execute("SHOW APPROVALS")
        names = [d.name for d in cur.description]
        return [r[names.index("id")] for r in cur.fetchall() if r[names.index("state")] == "pending"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--held", type=int, default=5)
    ap.add_argument("--pool-size", type=int, default=8)
    args = ap.parse_args()
    bindir = find_pg_bindir()
    pgbench = pgbench_bin(bindir)
    tmp = Path(tempfile.mkdtemp(prefix="pooler-bench-approvals-"))
    os.chmod(tmp, 0o755)
    pg = PgCluster()
    gw = None
    holders: list[subprocess.Popen] = []
    try:
        pg.start()
        pg.execute("CREATE DATABASE bench")
        subprocess.run([pgbench, "-i", "-q", "-s", "10", "-h", pg.host, "-p", str(pg.port), "-U", pg.superuser,
                        "bench"], check=True, capture_output=True, env=clean_env(PGPASSWORD=pg.password))
        db = f"host={pg.host} port={pg.port} dbname=bench user={pg.superuser} password={pg.password}"
        gw = GatewayProc({"bench": db}, settings={
            "pool_mode": "transaction", "default_pool_size": args.pool_size, "max_client_conn": 500,
            "rules_dir": str(REPO / "rules"), "admin_users": "reviewer", "approval_timeout": "0",
            "log_connections": 0, "log_disconnections": 0}, workdir=str(tmp))
        gw.start()
        t = Target("gateway", gw.host, gw.port, cpu_pid=gw.proc.pid, proc=gw)
        results: dict[str, list[float]] = {"none held": [], f"{args.held} held": []}
        for rnd in range(args.rounds):
            for label in results:
                if label != "none held":
                    env = clean_env(PGCONNECT_TIMEOUT="20")
                    holders = [subprocess.Popen(["psql", "-X", "-q", "-d", gw.dsn(user="postgres", dbname="bench"),
                                                 "-c", "UPDATE pgbench_branches SET bbalance = bbalance"],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
                               for _ in range(args.held)]
                    deadline = time.monotonic() + 30
                    while len(pending(gw)) < args.held:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the statements were not held")
                        time.sleep(0.05)
                tps, _, out = run_pgbench(pgbench, t, "simple", args.clients, 2, args.seconds)
                if tps != tps:
                    raise RuntimeError(f"pgbench failed:\n{out}")
                results[label].append(tps)
                log(f"round {rnd + 1}: {label}: {tps:.0f} tps")
                if holders:
                    with psycopg.connect(gw.dsn(user="reviewer", dbname="pgbouncer"), autocommit=True,
                                         prepare_threshold=None) as c:
                        for rid in pending(gw):
                            c.execute(f"DENY {rid} 'benchmark round over'")
                    for h in holders:
                        h.wait(30)
                    holders = []
        base, held = (statistics.median(v) for v in results.values())
        print(f"\npgbench -S -c {args.clients}, pool {args.pool_size}, {args.rounds} x {args.seconds:.0f} s per case")
        for label, v in results.items():
            print(f"  {label:<10} median {statistics.median(v):8.0f} tps   rounds: {', '.join(f'{x:.0f}' for x in v)}")
        print(f"  held / none held: {held / base:.3f}")
        return 0
    finally:
        for h in holders:
            h.kill()
        if gw is not None:
            gw.stop()
        pg.stop()


if __name__ == "__main__":
    raise SystemExit(main())

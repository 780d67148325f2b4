#!/usr/bin/env python3
"""pgbench through the gateway vs. PgBouncer vs. PostgreSQL directly.

    .venv/bin/python bench/pgbench_compare.py [--seconds 10] [--rounds 3] [--clients 10,50]
        [--modes simple,extended] [--pool-size 8] [--rules DIR | --compare-rules]
    ./dev.sh bench [same options]          # installs what is missing (pgbouncer too) first
    .venv/bin/python bench/pgbench_compare.py --baseline DIR   # + the gateway of another checkout
    .venv/bin/python bench/pgbench_compare.py --rules rules --audit   # + the same with audit_file on

Starts a throwaway PostgreSQL (pooler.pgcluster.PgCluster), ``pgbench -i -s SCALE`` on database
``bench``, the gateway (``python -m pooler run INI``, transaction pooling, trust auth) and, when
the ``pgbouncer`` binary exists, PgBouncer with the same pool size in transaction mode. Then, for
every round and every (protocol mode, client count), it runs ``pgbench -S -n -T SECONDS`` against
each target back to back (direct, gateway, [gateway+rules], [pgbouncer]) so that machine noise
hits all targets alike, and reports the median TPS over the rounds, the ratios, and the CPU time
each pooler process spent per transaction (utime+stime from /proc/PID/stat over the run), and
why a pooler costs throughput on a busy machine: the CPU time of the whole machine per
transaction (every process: pgbench, PostgreSQL, the pooler, the kernel's network work) and how
often the pooler was preempted (involuntary context switches) per 1000 transactions.

Without --rules the gateway runs with ``rules_dir`` set to an empty directory (no policy: pure
pooling cost). --rules DIR starts it with that rule set instead; --compare-rules runs both a
gateway without rules and one with the shipped rules (REPO/rules) as two targets.

Everything (servers, temporary directories) is removed at the end, on errors and on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/pgbench_compare.py` without PYTHONPATH (dev.sh)
    sys.path.insert(0, str(REPO))

from pooler.pgcluster import PgCluster, find_pg_bindir, free_port  # noqa: E402
from tests.gwproc import GatewayProc, wait_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


# --------------------------------------------------------------------------- CPU accounting

def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime in ticks) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the comm field: state(0) ppid(1) ... utime(11) stime(12)
    return int(fields[1]), int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """CPU time (user+system, all threads) of ``pid`` plus its live descendants."""
    stats: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = _proc_stat(int(name))
            if s is not None:
                stats[int(name)] = s
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen or p not in stats:
            continue
        seen.add(p)
        total += stats[p][1]
        todo.extend(c for c, (pp, _) in stats.items() if pp == p)
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (user, nice, system, irq, softirq) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK


def preemptions(pid: int) -> int:
    """Involuntary context switches of every thread of ``pid``: times it was runnable and lost
    its CPU to another task (a pooler that is preempted stalls all of its clients)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("nonvoluntary_ctxt_switches"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# --------------------------------------------------------------------------- targets

@dataclass
class Target:
    name: str
    host: str
    port: int
    password: str | None = None
    cpu_pid: int | None = None  # the pooler process whose CPU time is measured
    proc: object | None = None  # GatewayProc / PgBouncerProc (None: PostgreSQL itself)
    tps: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    cpu_us: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    machine_us: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    preempt: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # per 1000 xacts


def start_gateway(pg: PgCluster, workdir: Path, pool_size: int, rules_dir: Path,
                  repo: Path | None = None, extra: dict | None = None) -> GatewayProc:
    db = (f"host={pg.host} port={pg.port} dbname=bench user={pg.superuser} "
          f"password={pg.password}")
    gw = GatewayProc({"bench": db}, settings={
        "pool_mode": "transaction",
        "default_pool_size": pool_size,
        "max_client_conn": 500,
        "rules_dir": str(rules_dir),
        "log_connections": 0,
        "log_disconnections": 0,
        **(extra or {}),
    }, workdir=str(workdir), repo=repo)
    gw.start()
    return gw


def pgbouncer_version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


class PgBouncerProc:
    """PgBouncer in the foreground (as the postgres OS user when we are root)."""

    def __init__(self, binary: str, pg: PgCluster, workdir: Path, pool_size: int) -> None:
        self.binary = binary
        self.dir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.ini = workdir / "pgbouncer.ini"
        self.logpath = workdir / "pgbouncer.log"
        self.pidfile = workdir / "pgbouncer.pid"
        self.version = pgbouncer_version(binary)
        self.proc: subprocess.Popen | None = None
        lines = [
            "[databases]",
            f"bench = host={pg.host} port={pg.port} dbname=bench user={pg.superuser} password={pg.password}",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {workdir / 'userlist.txt'}",
            "pool_mode = transaction",
            f"default_pool_size = {pool_size}",
            "max_client_conn = 500",
            "ignore_startup_parameters = extra_float_digits",
            f"logfile = {self.logpath}",
            f"pidfile = {self.pidfile}",
            "log_connections = 0",
            "log_disconnections = 0",
            "server_reset_query = DISCARD ALL",
        ]
        if self.version >= (1, 21):  # protocol-level prepared statements in transaction mode
            lines.append("max_prepared_statements = 100")
        self.ini.write_text("\n".join(lines) + "\n")
        (workdir / "userlist.txt").write_text(f'"{pg.superuser}" ""\n')

    def start(self) -> "PgBouncerProc":
        argv = [self.binary, str(self.ini)]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            import pwd
            pw = pwd.getpwnam("postgres")
            for p in [self.dir, *self.dir.iterdir()]:
                os.chown(p, pw.pw_uid, pw.pw_gid)
            if shutil.which("setpriv"):  # execs in place: Popen's pid is pgbouncer's
                argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                        "--reset-env", *argv]
            else:
                argv = ["runuser", "-u", "postgres", "--", *argv]
        self._out = open(self.dir / "pgbouncer.stdout", "ab")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=str(self.dir), start_new_session=True,
                                     env=clean_env(LC_ALL="C", LANG="C"))
        try:
            wait_port(self.host, self.port, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"pgbouncer failed to start:\n{self.log()}")
        return self

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return self.proc.pid if self.proc else None

    def log(self) -> str:
        out = []
        for p in (self.logpath, self.dir / "pgbouncer.stdout"):
            try:
                out.append(p.read_text(errors="replace")[-3000:])
            except OSError:
                pass
        return "\n".join(out)

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            pid = self.pid
            for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT: safe shutdown; SIGTERM: immediate
                try:
                    os.kill(pid or p.pid, sig)
                except OSError:
                    pass
                try:
                    p.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if p.poll() is None:
                p.kill()
                p.wait(5)
        if getattr(self, "_out", None):
            self._out.close()


class FloorProc:
    """bench/floor_pooler.py: the least a Python/uvloop transaction pooler can do (the floor
    under the gateway's own cost); upstream logins need trust (see main)."""

    def __init__(self, pg: PgCluster, workdir: Path, pool_size: int) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.logpath = workdir / "floor.log"
        argv = [sys.executable, str(REPO / "bench" / "floor_pooler.py"), str(self.port), pg.host,
                str(pg.port), pg.superuser, "bench", str(pool_size)]
        self._out = open(self.logpath, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=clean_env())
        try:
            wait_port(self.host, self.port, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"floor_pooler.py failed to start:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.logpath.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


# --------------------------------------------------------------------------- pgbench

def pgbench_bin(bindir: str) -> str:
    cand = os.path.join(bindir, "pgbench")
    if os.access(cand, os.X_OK):
        return cand
    found = shutil.which("pgbench")
    if not found:
        raise SystemExit("pgbench not found; install the postgresql (or postgresql-contrib) package")
    return found


_TPS = re.compile(r"^tps = ([0-9.]+) \((?:without|excluding) (?:initial )?connection", re.M)
_TPS_ANY = re.compile(r"^tps = ([0-9.]+)", re.M)
_XACTS = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")


def run_pgbench(pgbench: str, t: Target, mode: str, clients: int, threads: int,
                seconds: float) -> tuple[float, int, str]:
    """(tps, transactions, output); tps is NaN when pgbench failed."""
    argv = [pgbench, "-S", "-n", "-T", str(int(seconds)), "-c", str(clients), "-j", str(threads),
            "-M", mode, "-h", t.host, "-p", str(t.port), "-U", "postgres", "bench"]
    env = clean_env(PGCONNECT_TIMEOUT="20", PGSSLMODE="disable", LC_ALL="C",
                    **({"PGPASSWORD": t.password} if t.password else {}))
    r = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                       timeout=seconds + 120)
    out = r.stdout + r.stderr
    m = _TPS.search(r.stdout) or _TPS_ANY.search(r.stdout)
    x = _XACTS.search(r.stdout)
    failed = _FAILED.search(r.stdout)
    if r.returncode != 0 or not m or not x or (failed and int(failed.group(1)) > 0):
        return float("nan"), 0, out
    return float(m.group(1)), int(x.group(1)), out


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pgbench_compare.py",
                                 description="pgbench -S: PostgreSQL direct vs. the gateway vs. PgBouncer")
    ap.add_argument("--seconds", type=int, default=10, help="length of each pgbench run (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    ap.add_argument("--clients", default="10,50", help="comma-separated client counts (default 10,50)")
    ap.add_argument("--modes", default="simple,extended",
                    help="comma-separated pgbench -M modes: simple, extended, prepared (default simple,extended)")
    ap.add_argument("--pool-size", type=int, default=8, help="server connections per pool (default 8)")
    ap.add_argument("--threads", type=int, default=0,
                    help="pgbench -j (default: min(clients, CPU count))")
    ap.add_argument("--scale", type=int, default=1, help="pgbench -i -s (default 1)")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target (default 2; 0: none)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--rules", metavar="DIR", help="start the gateway with rules_dir = DIR (default: no rules)")
    g.add_argument("--compare-rules", action="store_true",
                   help=f"two gateway targets: without rules and with the shipped rules ({REPO / 'rules'})")
    ap.add_argument("--floor", action="store_true",
                    help="add bench/floor_pooler.py, the least a Python/uvloop pooler can do, as a target "
                         "(PostgreSQL then trusts 127.0.0.1 logins to database bench)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="add the gateway of another checkout (e.g. `git worktree add DIR REV`) as target "
                         "gateway@base, with the same rules: before/after a change in the same run")
    ap.add_argument("--audit", action="store_true",
                    help="also run the (last) gateway with audit_file on, as one more target")
    ap.add_argument("--no-pgbouncer", action="store_true", help="skip PgBouncer even where it is installed")
    ap.add_argument("--pgbouncer", default=None, help="pgbouncer binary (default: $PATH, /usr/sbin, /usr/local/sbin)")
    a = ap.parse_args(argv)
    try:
        a.client_list = [int(c) for c in a.clients.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--clients: not a comma-separated list of numbers: {a.clients!r}")
    a.mode_list = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in a.mode_list:
        if m not in ("simple", "extended", "prepared"):
            ap.error(f"--modes: unknown pgbench mode {m!r}")
    if not a.client_list or any(c < 1 for c in a.client_list):
        ap.error("--clients: need at least one positive number")
    if a.seconds < 1 or a.rounds < 1 or a.pool_size < 1:
        ap.error("--seconds, --rounds and --pool-size must be >= 1")
    if a.rules and not Path(a.rules).is_dir():
        ap.error(f"--rules: {a.rules} is not a directory")
    if a.baseline and not (Path(a.baseline) / "pooler" / "__main__.py").is_file():
        ap.error(f"--baseline: {a.baseline} is not a checkout of this project")
    return a


def find_pgbouncer(explicit: str | None) -> str | None:
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/usr/local/sbin"
    return shutil.which("pgbouncer", path=path)


def fmt(x: float | None, spec: str = ".0f") -> str:
    if x is None or x != x:  # None or NaN
        return "-"
    return format(x, spec)


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if a == a and b == b and b > 0 else float("nan")


def report(targets: list[Target], args: argparse.Namespace) -> None:
    by = {t.name: t for t in targets}
    names = [t.name for t in targets]
    ratios: list[tuple[str, str, str]] = []  # (label, numerator, denominator)
    gws = [n for n in names if n.startswith("gateway")]
    for gwn in gws:
        if "pgbouncer" in by:
            ratios.append((f"{gwn}/pgbouncer", gwn, "pgbouncer"))
        ratios.append((f"{gwn}/direct", gwn, "direct"))
        if f"{gwn}@base" in by:
            ratios.append((f"{gwn}/base", gwn, f"{gwn}@base"))
    if "gateway+rules" in by and "gateway" in by:
        ratios.append(("rules/no-rules", "gateway+rules", "gateway"))
    if "floor" in by:
        if "pgbouncer" in by:
            ratios.append(("floor/pgbouncer", "floor", "pgbouncer"))
        if "gateway" in by:
            ratios.append(("gateway/floor", "gateway", "floor"))
    if "pgbouncer" in by:
        ratios.append(("pgbouncer/direct", "pgbouncer", "direct"))

    head = ["mode", "clients"] + [f"{n} tps" for n in names] + [r[0] for r in ratios]
    rows = []
    for mode in args.mode_list:
        for c in args.client_list:
            k = (mode, c)
            tps = {n: median(by[n].tps.get(k, [])) for n in names}
            rows.append([mode, str(c)] + [fmt(tps[n]) for n in names]
                        + [fmt(ratio(tps[a], tps[b]), ".2f") for _, a, b in ratios])
    print()
    print(f"pgbench -S -n -T {args.seconds}, pool size {args.pool_size}, median of {args.rounds} round(s)"
          f" (TPS excluding connection time)")
    _table(head, rows)

    cpu_targets = [t for t in targets if t.cpu_pid is not None]
    if cpu_targets:
        head = ["mode", "clients"] + [f"{t.name} us/xact" for t in cpu_targets]
        if "pgbouncer" in by and by["pgbouncer"].cpu_pid is not None:
            head += [f"{t.name}/pgbouncer cpu" for t in cpu_targets if t.name != "pgbouncer"]
        rows = []
        for mode in args.mode_list:
            for c in args.client_list:
                k = (mode, c)
                cpu = {t.name: median(t.cpu_us.get(k, [])) for t in cpu_targets}
                row = [mode, str(c)] + [fmt(cpu[t.name], ".1f") for t in cpu_targets]
                if "pgbouncer" in cpu:
                    row += [fmt(ratio(cpu[t.name], cpu["pgbouncer"]), ".1f")
                            for t in cpu_targets if t.name != "pgbouncer"]
                rows.append(row)
        print()
        print("CPU time of the pooler process per transaction (utime+stime, microseconds, median)")
        _table(head, rows)

    head = ["mode", "clients"] + [f"{t.name} us/xact" for t in targets]
    head += [f"{t.name} preempt/1k" for t in cpu_targets]
    rows = []
    for mode in args.mode_list:
        for c in args.client_list:
            k = (mode, c)
            rows.append([mode, str(c)] + [fmt(median(t.machine_us.get(k, [])), ".0f") for t in targets]
                        + [fmt(median(t.preempt.get(k, [])), ".0f") for t in cpu_targets])
    print()
    print("CPU time of the whole machine per transaction (all processes and the kernel, microseconds,"
          " median) and times the pooler was preempted per 1000 transactions")
    _table(head, rows)

    if args.rounds > 1:
        print()
        print("all rounds (TPS):")
        for mode in args.mode_list:
            for c in args.client_list:
                parts = [f"{n} " + "/".join(fmt(x) for x in by[n].tps.get((mode, c), [])) for n in names]
                print(f"  {mode:8} {c:3}  " + "  ".join(parts))
    sys.stdout.flush()


def _table(head: list[str], rows: list[list[str]]) -> None:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w[i]) if i > 1 else h.ljust(w[i]) for i, h in enumerate(head)))
    print("  ".join("-" * x for x in w))
    for r in rows:
        print("  ".join(v.rjust(w[i]) if i > 1 else v.ljust(w[i]) for i, v in enumerate(r)))


def unwind_on_signals() -> None:
    """Ctrl-C (even when started with SIGINT ignored, e.g. from a script's background job),
    SIGTERM and SIGHUP raise KeyboardInterrupt: the caller's finally stops everything."""
    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bindir = find_pg_bindir()
    pgbench = pgbench_bin(bindir)
    pgb_bin = None if args.no_pgbouncer else find_pgbouncer(args.pgbouncer)
    if not args.no_pgbouncer and pgb_bin is None:
        log("pgbouncer not found: comparing with PostgreSQL directly only (./dev.sh bench installs it)")

    unwind_on_signals()

    tmp = Path(tempfile.mkdtemp(prefix="pooler-bench-"))
    os.chmod(tmp, 0o755)
    pg = PgCluster()
    started: list = []
    try:
        log(f"starting PostgreSQL ({bindir})")
        pg.start()
        pg.execute("CREATE DATABASE bench")
        log(f"pgbench -i -s {args.scale}")
        r = subprocess.run([pgbench, "-i", "-q", "-s", str(args.scale), "-h", pg.host, "-p", str(pg.port),
                            "-U", pg.superuser, "bench"], capture_output=True, text=True,
                           env=clean_env(PGPASSWORD=pg.password), stdin=subprocess.DEVNULL, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"pgbench -i failed:\n{r.stdout}{r.stderr}")
        pg.execute("VACUUM ANALYZE", dbname="bench")
        if args.floor:  # the floor pooler logs in upstream without a password
            pg.set_hba([f"host bench {pg.superuser} 127.0.0.1/32 trust", *PgCluster.default_hba()])

        targets = [Target("direct", pg.host, pg.port, password=pg.password)]
        empty_rules = tmp / "no-rules"
        empty_rules.mkdir()
        gw_specs: list[tuple[str, Path]] = []
        if args.compare_rules:
            gw_specs = [("gateway", empty_rules), ("gateway+rules", REPO / "rules")]
        elif args.rules:
            gw_specs = [("gateway+rules", Path(args.rules).resolve())]
        else:
            gw_specs = [("gateway", empty_rules)]
        specs = [(name, rules, None, None) for name, rules in gw_specs]
        if args.baseline:
            specs.insert(1, (f"{gw_specs[0][0]}@base", gw_specs[0][1], Path(args.baseline).resolve(), None))
        if args.audit:  # the same gateway with the audit stream written to a file
            specs.append((f"{gw_specs[-1][0]}+audit", gw_specs[-1][1], None, {"audit_file": "audit.jsonl"}))
        for name, rules, repo, extra in specs:
            wd = tmp / name.replace("+", "-").replace("@", "-")
            wd.mkdir()  # no rules/ beside the ini: rules_dir decides
            log(f"starting {name} (rules_dir = {rules}{f', from {repo}' if repo else ''}{f', {extra}' if extra else ''})")
            gw = start_gateway(pg, wd, args.pool_size, rules, repo, extra)
            started.append(gw)
            targets.append(Target(name, gw.host, gw.port, cpu_pid=gw.proc.pid, proc=gw))
        if pgb_bin:
            wd = tmp / "pgbouncer"
            wd.mkdir()
            pgb = PgBouncerProc(pgb_bin, pg, wd, args.pool_size)
            if "prepared" in args.mode_list and pgb.version < (1, 21):
                log(f"PgBouncer {'.'.join(map(str, pgb.version))} < 1.21: -M prepared will fail against it")
            log(f"starting PgBouncer {'.'.join(map(str, pgb.version))} ({pgb_bin})")
            pgb.start()
            started.append(pgb)
            targets.append(Target("pgbouncer", pgb.host, pgb.port, cpu_pid=pgb.pid, proc=pgb))

        if args.floor:
            wd = tmp / "floor"
            wd.mkdir()
            log("starting the floor pooler (bench/floor_pooler.py)")
            fl = FloorProc(pg, wd, args.pool_size)
            started.append(fl)
            targets.append(Target("floor", fl.host, fl.port, cpu_pid=fl.pid, proc=fl))

        ncpu = os.cpu_count() or 1
        if args.warmup > 0:
            for t in targets:
                for mode in args.mode_list:
                    tps, _, out = run_pgbench(pgbench, t, mode, max(args.client_list),
                                              min(max(args.client_list), ncpu), args.warmup)
                    if tps != tps:
                        raise RuntimeError(f"warm-up of {t.name} (-M {mode}) failed:\n{out[-3000:]}")

        total = args.rounds * len(args.mode_list) * len(args.client_list) * len(targets)
        log(f"{total} runs of {args.seconds}s (~{total * args.seconds / 60:.1f} min)")
        for rnd in range(1, args.rounds + 1):
            for mode in args.mode_list:
                for c in args.client_list:
                    threads = args.threads or min(c, ncpu)
                    threads = min(threads, c)
                    line = []
                    for t in targets:
                        cpu0 = cpu_seconds(t.cpu_pid) if t.cpu_pid else 0.0
                        pre0 = preemptions(t.cpu_pid) if t.cpu_pid else 0
                        busy0 = machine_busy_seconds()
                        tps, xacts, out = run_pgbench(pgbench, t, mode, c, threads, args.seconds)
                        busy1 = machine_busy_seconds()
                        cpu1 = cpu_seconds(t.cpu_pid) if t.cpu_pid else 0.0
                        pre1 = preemptions(t.cpu_pid) if t.cpu_pid else 0
                        k = (mode, c)
                        t.tps.setdefault(k, []).append(tps)
                        if xacts:
                            t.machine_us.setdefault(k, []).append((busy1 - busy0) / xacts * 1e6)
                        if t.cpu_pid and xacts:
                            t.cpu_us.setdefault(k, []).append((cpu1 - cpu0) / xacts * 1e6)
                            t.preempt.setdefault(k, []).append((pre1 - pre0) / xacts * 1000)
                        if tps != tps:
                            log(f"{t.name} -M {mode} -c {c} failed:\n{out[-2000:]}")
                            p = getattr(t.proc, "proc", None)
                            if p is not None and p.poll() is not None:
                                raise RuntimeError(f"{t.name} exited ({p.returncode}); its log:\n"
                                                   f"{t.proc.log()[-3000:]}")
                        line.append(f"{t.name}={fmt(tps)}")
                    log(f"round {rnd}/{args.rounds} -M {mode:8} -c {c:3} -j {threads}: " + " ".join(line))
        report(targets, args)
        return 0
    except RuntimeError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        stop_all(started, pg, tmp)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_all(started: list, pg: PgCluster, tmp) -> None:
    """Stop the poolers (newest first) and PostgreSQL, remove the temporary directory; a
    second Ctrl-C meanwhile must not skip any of it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for proc in reversed(started):
        try:
            proc.stop()
        except Exception as e:  # noqa: BLE001
            log(f"stopping {type(proc).__name__}: {e}")
    try:
        pg.stop()
    except Exception as e:  # noqa: BLE001
        log(f"stopping PostgreSQL: {e}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

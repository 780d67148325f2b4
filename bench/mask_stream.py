#!/usr/bin/env python3
"""Stream a large result through the gateway with and without masking, and through PgBouncer.

    .venv/bin/python bench/mask_stream.py [--rows 1000000] [--rounds 3] [--slow]
    (./dev.sh setup --with-pgbouncer installs PgBouncer when it is missing)

Starts a throwaway PostgreSQL (pooler.pgcluster.PgCluster) with the demo "shop" schema seeded into
database ``bench`` (pooler.pgcluster.seed_demo: 200 customers), the gateway (``python -m pooler run
INI``, tests/gwproc.py:GatewayProc) with the shipped rules (REPO/rules) and the users

    agent  = groups=agents        -> customers.email/phone are masked ("email", "partial")
    reader = groups=pii-readers   -> nothing is masked: the DataRows pass unparsed

and, where the binary exists, PgBouncer (bench/pgbench_compare.py:PgBouncerProc) with the same pool
size. Every variant runs the same statement, ``SELECT c.id, c.email, c.phone, c.city, g FROM
customers c, generate_series(1, ROWS/200) g`` (1,000,000 rows by default), with ``psql -X -At``:

    direct            psql -> PostgreSQL
    pgbouncer         psql -> PgBouncer -> PostgreSQL
    gateway           psql -> gateway (user reader, rules loaded, no mask applies) -> PostgreSQL
    gateway+mask      psql -> gateway (user agent: email and phone rewritten in every row)

one after the other in each round (so machine noise hits all of them alike), and reports medians.

Why psql: libpq reads the whole result in C as fast as the socket delivers it, so the client
is never the bottleneck and costs little of the 2 shared CPUs; its ``\\timing`` stops the clock
when the last row has arrived, *before* psql formats and prints the rows, so the reported time is
the server -> pooler -> client path alone (wall time, including printing, is reported too).
psycopg's ``cursor.stream()`` (libpq single-row mode) would spend several Python function calls
per row in the client and mostly measure itself; named cursors (DECLARE/FETCH, also psql's
FETCH_COUNT before PostgreSQL 17) over masked columns are refused by the gateway.

Output of each run goes to a file in /dev/shm (or the temporary directory) and is checked after
the clock stopped: the row count must match, and in the masked runs every e-mail must be masked
(``***@domain``), no raw e-mail or phone of the customers table may appear, and the unmasked runs
must show the real e-mails (so the check means something).

Peak RSS: before each gateway run the gateway's VmHWM (peak resident set) is reset (``echo 5 >
/proc/PID/clear_refs``, Linux >= 4.0, needs to own the process) so that the peak of *that* run is
read from /proc/PID/status afterwards; the gateway's lifetime VmHWM is reported at the end too.

--slow adds ``gateway+mask slow``: a minimal protocol client on a raw socket (small receive
buffer) reading the masked stream at --slow-rate bytes/s, while a thread samples the gateway's
VmRSS every 100 ms. With backpressure working the gateway's RSS stays flat however slow the
client is; without it the gateway would buffer the whole result (~60 MB per million rows).

Exit status: 0 when every run succeeded and no raw e-mail reached a masked client; 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.pgbench_compare import (  # noqa: E402
    PgBouncerProc, _table, clean_env, cpu_seconds, find_pgbouncer, fmt, log, median, ratio,
    stop_all, unwind_on_signals)
from pooler.pgcluster import PgCluster, find_pg_bindir, seed_demo  # noqa: E402
from tests.gwproc import GatewayProc  # noqa: E402

DB = "bench"  # PgBouncerProc serves database "bench"
USERS = {"agent": "groups=agents", "reader": "groups=pii-readers"}
CUSTOMERS = 200  # rows of customers in the demo data


# --------------------------------------------------------------------------- memory

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a live process."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def reset_hwm(pid: int) -> bool:
    """Reset the peak RSS (VmHWM) of ``pid`` to its current RSS."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mb(kb: float | None) -> float:
    return float("nan") if kb is None else kb / 1024


class RssSampler(threading.Thread):
    """Samples VmRSS of ``pid`` every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop_ev = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._stop_ev.is_set():
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic() - t0, rss))
            self._stop_ev.wait(self.interval)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(5)


# --------------------------------------------------------------------------- variants

@dataclass
class Variant:
    name: str
    host: str
    port: int
    user: str
    password: str | None = None
    masked: bool = False
    gw_pid: int | None = None  # the gateway process, whose RSS and CPU are measured
    pooler_pid: int | None = None  # the process whose CPU time is measured (gateway / pgbouncer)
    proc: object | None = None
    secs: list[float] = field(default_factory=list)  # receive time (psql \timing)
    wall: list[float] = field(default_factory=list)  # psql wall time, printing included
    cpu: list[float] = field(default_factory=list)  # pooler CPU seconds per run
    peak_kb: list[int] = field(default_factory=list)  # gateway VmHWM over each run
    failures: int = 0


_TIME = re.compile(rb"^Time: ([0-9.]+) ms", re.M)


DISTINCT_FIRST = 1001  # --distinct: customers from this id on are the bench's own, one per row
_DISTINCT_PHONE = re.compile(rb"\+1-555-[0-9]{7}")


def query_sql(rows: int, distinct: bool = False) -> str:
    if distinct:
        return (f"SELECT c.id, c.email, c.phone, c.city, 1 FROM customers c "
                f"WHERE c.id >= {DISTINCT_FIRST} ORDER BY c.id LIMIT {rows}")
    per = -(-rows // CUSTOMERS)
    sql = f"SELECT c.id, c.email, c.phone, c.city, g FROM customers c, generate_series(1, {per}) g"
    if per * CUSTOMERS != rows:
        sql += f" LIMIT {rows}"
    return sql


def run_psql(psql: str, v: Variant, sql: str, outfile: Path) -> tuple[float, float, str]:
    """(receive seconds, wall seconds, error text); NaN seconds when psql failed."""
    dsn = (f"host={v.host} port={v.port} dbname={DB} user={v.user} sslmode=disable "
           f"connect_timeout=20 application_name=mask_stream")
    env = clean_env(LC_ALL="C", **({"PGPASSWORD": v.password} if v.password else {}))
    argv = [psql, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", "\\timing on", "-c", sql]
    with open(outfile, "wb") as out:
        t0 = time.perf_counter()
        r = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL,
                           timeout=1800)
        wall = time.perf_counter() - t0
    err = r.stderr.decode(errors="replace")
    if r.returncode != 0:
        return float("nan"), wall, err or f"psql exited {r.returncode}"
    # "Time: N ms" is the last line psql writes (after the rows)
    with open(outfile, "rb") as f:
        f.seek(max(0, outfile.stat().st_size - 200))
        m = None
        for m in _TIME.finditer(f.read()):
            pass
    if m is None:
        return float("nan"), wall, "psql printed no 'Time:' line"
    return float(m.group(1)) / 1000, wall, err


_RAW_EMAIL = re.compile(rb"[^*|\n]@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


def check_output(outfile: Path, rows: int, masked: bool, raw_emails: set[bytes],
                 raw_phones: set[bytes], distinct: bool = False) -> str | None:
    """None when the output is right; else what is wrong."""
    data = outfile.read_bytes()
    # drop the "Timing is on." first line and the "Time: ..." last line
    first = data.find(b"\n") + 1
    last = data.rfind(b"\nTime: ")
    body = data[first:last + 1] if last >= 0 else data[first:]
    n = body.count(b"\n")
    if n != rows:
        return f"{n} rows instead of {rows}"
    if masked:
        m = _RAW_EMAIL.search(body)
        if m:
            s = max(0, body.rfind(b"\n", 0, m.start()) + 1)
            e = body.find(b"\n", m.end())
            return f"a raw e-mail reached the masked client: {body[s:e]!r}"
        phones = re.compile(b"|".join(re.escape(ph) for ph in sorted(raw_phones)))
        m = phones.search(body)
        if m:
            s = max(0, body.rfind(b"\n", 0, m.start()) + 1)
            e = body.find(b"\n", m.end())
            return f"a raw phone number reached the masked client: {body[s:e]!r}"
        m = _DISTINCT_PHONE.search(body) if distinct else None
        if m:
            return f"a raw phone number reached the masked client: {m.group(0)!r}"
        # every 997th of the first 20000 rows in full: e-mail masked, phone not raw
        lines = body.split(b"\n", 20000)[:-1]
        for line in lines[::997] + [lines[-1]] if lines else []:
            f = line.split(b"|")
            if len(f) != 5:
                return f"unexpected row {line!r}"
            if not f[1].startswith(b"***") or f[1] in raw_emails:
                return f"e-mail not masked: {line!r}"
            if f[2] in raw_phones:
                return f"phone not masked: {line!r}"
    else:
        head = body[:100000].split(b"\n")[0].split(b"|")
        if len(head) != 5 or not (head[1] in raw_emails or (distinct and head[1].startswith(b"bench."))):
            return f"unmasked output does not show the real e-mail: {head!r}"
    return None


# --------------------------------------------------------------------------- slow client

def _startup(sock: socket.socket, user: str, dbname: str) -> None:
    params = b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                      for k, v in (("user", user), ("database", dbname),
                                   ("application_name", "mask_stream_slow"))) + b"\0"
    sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed during login")
        buf += chunk
        while len(buf) >= 5:
            t = buf[0]
            (ln,) = struct.unpack_from("!i", buf, 1)
            if len(buf) < 1 + ln:
                break
            body, buf = buf[5:1 + ln], buf[1 + ln:]
            if t == ord("R") and struct.unpack_from("!i", body)[0] != 0:
                raise RuntimeError("the slow client only does trust logins")
            if t == ord("E"):
                raise RuntimeError(f"login failed: {body!r}")
            if t == ord("Z"):
                if buf:
                    raise RuntimeError("unexpected data after ReadyForQuery")
                return


def slow_stream(host: str, port: int, user: str, sql: str, rate: float,
                chunk: int = 16384) -> tuple[int, float, list[list[bytes | None]], str | None]:
    """Read ``sql``'s result over a raw socket at about ``rate`` bytes/s.
    Returns (DataRows, seconds, a sample of rows, error or None)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)  # before connect: small window
    sock.settimeout(120)
    sock.connect((host, port))
    try:
        _startup(sock, user, DB)
        q = sql.encode() + b"\0"
        sock.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
        t0 = time.perf_counter()
        buf = bytearray()
        pos = 0
        nrows = 0
        sample: list[list[bytes | None]] = []
        error = None
        received = 0
        while True:
            data = sock.recv(chunk)
            if not data:
                return nrows, time.perf_counter() - t0, sample, "connection closed mid-result"
            received += len(data)
            del buf[:pos]
            pos = 0
            buf += data
            n = len(buf)
            while n - pos >= 5:
                t = buf[pos]
                (ln,) = struct.unpack_from("!i", buf, pos + 1)
                end = pos + 1 + ln
                if end > n:
                    break
                if t == 68:  # 'D'
                    nrows += 1
                    if nrows % 9973 == 1:
                        (nf,) = struct.unpack_from("!h", buf, pos + 5)
                        p, row = pos + 7, []
                        for _ in range(nf):
                            (fl,) = struct.unpack_from("!i", buf, p)
                            p += 4
                            if fl < 0:
                                row.append(None)
                            else:
                                row.append(bytes(buf[p:p + fl]))
                                p += fl
                        sample.append(row)
                elif t == 69:  # 'E'
                    error = bytes(buf[pos + 5:end]).replace(b"\0", b" ").decode(errors="replace")
                elif t == 90:  # 'Z'
                    return nrows, time.perf_counter() - t0, sample, error
                pos = end
            # throttle: never ahead of rate
            ahead = received / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
    finally:
        try:
            sock.sendall(b"X\0\0\0\4")
        except OSError:
            pass
        sock.close()


# --------------------------------------------------------------------------- profile

def start_profile(path: str, pid: int) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        log("py-spy not found (pip install py-spy): no profile")
        return None
    p = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                          "--output", path, "--nonblocking"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    time.sleep(1.0)  # attach before the run starts
    return p


_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def stop_profile(p: subprocess.Popen, path: str, top: int = 12) -> str | None:
    """Stop py-spy; the top frames (self and inclusive time, by function and by line) as text."""
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        log(f"py-spy wrote no profile: {err.decode(errors='replace')[-1000:]}")
        return None
    self_fn: dict[str, int] = {}
    self_line: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        k = int(n)
        frames = stack.split(";")
        fns = [(lambda m: f"{m.group(1)} ({m.group(2)})" if m else f)(_FRAME.match(f)) for f in frames]
        total += k
        self_line[frames[-1]] = self_line.get(frames[-1], 0) + k
        self_fn[fns[-1]] = self_fn.get(fns[-1], 0) + k
        for f in set(fns):
            incl[f] = incl.get(f, 0) + k
    if not total:
        log("py-spy profile is empty")
        return None

    def block(title: str, d: dict[str, int]) -> list[str]:
        return [f"  {title}"] + [f"  {100 * k / total:6.1f}  {f}"
                                 for f, k in sorted(d.items(), key=lambda x: -x[1])[:top]]
    out = [f"py-spy profile of the gateway during one extra masked run ({total} samples at 250 Hz, "
           f"idle samples excluded; {path}):"]
    out += block("self %  function", self_fn) + block("self %  line", self_line)
    out += block("incl %  function", incl)
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mask_stream.py",
                                 description="stream ROWS rows: PostgreSQL direct vs. PgBouncer vs. "
                                             "the gateway unmasked and masked")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows per run (default 1000000)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    ap.add_argument("--slow", action="store_true",
                    help="also stream the masked result to a slow client (backpressure, RSS over time)")
    ap.add_argument("--slow-rate", type=float, default=1e6,
                    help="bytes/s the slow client reads (default 1000000: ~65 s for 1M masked rows)")
    ap.add_argument("--slow-rows", type=int, default=0, help="rows of the slow run (default: --rows)")
    ap.add_argument("--profile", metavar="FILE",
                    help="record the gateway with py-spy (collapsed stacks to FILE) during the first masked "
                         "run and print its top frames (pip install py-spy)")
    ap.add_argument("--distinct", action="store_true",
                    help="every row's e-mail and phone different (the per-column memo never hits)")
    ap.add_argument("--python-twin", action="store_true",
                    help="add 'gateway+mask py': a second gateway with POOLER_PURE_PYTHON=1 (the masked-row "
                         "rewrite in Python, not its compiled twin), in the same rounds")
    ap.add_argument("--pool-size", type=int, default=2, help="server connections per pool (default 2)")
    ap.add_argument("--no-pgbouncer", action="store_true", help="skip PgBouncer even where it is installed")
    ap.add_argument("--pgbouncer", default=None, help="pgbouncer binary (default: $PATH, /usr/sbin, /usr/local/sbin)")
    a = ap.parse_args(argv)
    if a.rows < 1 or a.rounds < 1 or a.pool_size < 1 or a.slow_rate <= 0:
        ap.error("--rows, --rounds, --pool-size and --slow-rate must be positive")
    a.slow_rows = a.slow_rows or a.rows
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bindir = find_pg_bindir()
    psql = os.path.join(bindir, "psql")
    if not os.access(psql, os.X_OK):
        psql = shutil.which("psql") or sys.exit("psql not found; install the postgresql-client package")
    pgb_bin = None if args.no_pgbouncer else find_pgbouncer(args.pgbouncer)
    if not args.no_pgbouncer and pgb_bin is None:
        log("pgbouncer not found: no PgBouncer comparison (./dev.sh setup --with-pgbouncer installs it)")

    unwind_on_signals()

    tmp = Path(tempfile.mkdtemp(prefix="pooler-maskbench-"))
    os.chmod(tmp, 0o755)
    outdir = Path(tempfile.mkdtemp(prefix="pooler-maskbench-out-", dir="/dev/shm")) \
        if os.path.isdir("/dev/shm") else tmp
    pg = PgCluster()
    started: list = []
    failed = False
    try:
        log(f"starting PostgreSQL ({bindir})")
        pg.start()
        seed_demo(pg, DB)
        pg.execute("VACUUM ANALYZE", dbname=DB)
        raw = pg.psql("SELECT email, phone FROM customers", dbname=DB).split()
        raw_emails = {line.split("|")[0].encode() for line in raw}
        raw_phones = {line.split("|")[1].encode() for line in raw}
        if len(raw_emails) != CUSTOMERS:
            raise RuntimeError(f"expected {CUSTOMERS} customers, found {len(raw_emails)}")
        if args.distinct:  # one customer per row: every e-mail and phone of the result differs
            log(f"--distinct: adding {args.rows} customers with e-mails and phones of their own")
            pg.execute("INSERT INTO customers (id, full_name, email, phone, city) "
                       f"SELECT i, 'Bench ' || i, 'bench.' || i || '@example.com', '+1-555-' || lpad(i::text, 7, '0'), "
                       f"'Springfield' FROM generate_series({DISTINCT_FIRST}, {DISTINCT_FIRST + args.rows + 20000}) i",
                       dbname=DB)
            pg.execute("VACUUM ANALYZE customers", dbname=DB)

        wd = tmp / "gateway"
        wd.mkdir()
        upstream = f"host={pg.host} port={pg.port} dbname={DB} user={pg.superuser} password={pg.password}"
        gw = GatewayProc({DB: upstream}, settings={
            "pool_mode": "transaction",
            "default_pool_size": args.pool_size,
            "rules_dir": str(REPO / "rules"),
            "mask_hash_key": "mask-stream-bench",
            "log_connections": 0,
            "log_disconnections": 0,
        }, users=USERS, workdir=str(wd))
        log(f"starting the gateway (rules_dir = {REPO / 'rules'})")
        gw.start()
        started.append(gw)
        gpid = gw.proc.pid

        variants = [Variant("direct", pg.host, pg.port, pg.superuser, password=pg.password)]
        if pgb_bin:
            pwd = tmp / "pgbouncer"
            pwd.mkdir()
            pgb = PgBouncerProc(pgb_bin, pg, pwd, args.pool_size)
            log(f"starting PgBouncer {'.'.join(map(str, pgb.version))} ({pgb_bin})")
            pgb.start()
            started.append(pgb)
            variants.append(Variant("pgbouncer", pgb.host, pgb.port, pg.superuser, pooler_pid=pgb.pid, proc=pgb))
        variants.append(Variant("gateway", gw.host, gw.port, "reader", gw_pid=gpid, pooler_pid=gpid, proc=gw))
        variants.append(Variant("gateway+mask", gw.host, gw.port, "agent", masked=True, gw_pid=gpid,
                                pooler_pid=gpid, proc=gw))
        if args.python_twin:
            wd2 = tmp / "gateway-py"
            wd2.mkdir()
            gwpy = GatewayProc({DB: upstream}, settings=dict(gw.settings, listen_port=None), users=USERS,
                               workdir=str(wd2))
            os.environ["POOLER_PURE_PYTHON"] = "1"
            try:
                gwpy.settings["listen_port"] = str(gwpy.port)
                gwpy.write_ini()
                gwpy.start()
            finally:
                del os.environ["POOLER_PURE_PYTHON"]
            started.append(gwpy)
            variants.append(Variant("gateway+mask py", gwpy.host, gwpy.port, "agent", masked=True,
                                    gw_pid=gwpy.proc.pid, pooler_pid=gwpy.proc.pid, proc=gwpy))

        by_name = {v.name: v for v in variants}
        sql = query_sql(args.rows, args.distinct)
        log(f"query: {sql}")
        # warm-up: connections, the gateway's rule decisions, its catalog for the masking plans
        for v in variants:
            secs, _, err = run_psql(psql, v, query_sql(min(args.rows, 20000), args.distinct), outdir / "warmup.out")
            bad = err if secs != secs else check_output(outdir / "warmup.out", min(args.rows, 20000),
                                                        v.masked, raw_emails, raw_phones, args.distinct)
            if bad:
                raise RuntimeError(f"warm-up of {v.name} failed: {bad.strip()[-2000:]}")
        (outdir / "warmup.out").unlink(missing_ok=True)
        st = proc_status(gpid)
        base_rss, hwm_before = st.get("VmRSS"), st.get("VmHWM")
        log(f"gateway after warm-up: RSS {fmt(mb(base_rss), '.1f')} MB, peak so far {fmt(mb(hwm_before), '.1f')} MB")
        can_reset = reset_hwm(gpid)
        if not can_reset:
            log("cannot reset VmHWM (/proc/PID/clear_refs): peaks below are the gateway's lifetime peak")

        for rnd in range(1, args.rounds + 1):
            line = []
            for v in variants:
                out = outdir / f"{v.name}.out"
                if v.gw_pid and can_reset:
                    reset_hwm(v.gw_pid)
                cpu0 = cpu_seconds(v.pooler_pid) if v.pooler_pid else 0.0
                secs, wall, err = run_psql(psql, v, sql, out)
                cpu1 = cpu_seconds(v.pooler_pid) if v.pooler_pid else 0.0
                if v.gw_pid:
                    v.peak_kb.append(proc_status(v.gw_pid).get("VmHWM", 0))
                problem = err.strip() if secs != secs else check_output(out, args.rows, v.masked,
                                                                         raw_emails, raw_phones, args.distinct)
                out.unlink(missing_ok=True)
                if problem:
                    v.failures += 1
                    failed = True
                    log(f"{v.name}: FAILED: {problem[-2000:]}")
                    secs = float("nan")
                    p = getattr(v.proc, "proc", None)
                    if p is not None and p.poll() is not None:
                        raise RuntimeError(f"{v.name}: the pooler exited ({p.returncode}); its log:\n"
                                           f"{v.proc.log()[-3000:]}")
                v.secs.append(secs)
                v.wall.append(wall)
                if v.pooler_pid:
                    v.cpu.append(cpu1 - cpu0)
                extra = f" peak {mb(v.peak_kb[-1]):.0f} MB" if v.gw_pid else ""
                line.append(f"{v.name}={fmt(secs, '.2f')}s{extra}")
            log(f"round {rnd}/{args.rounds}: " + "  ".join(line))

        profile = None
        if args.profile:  # one more masked run under py-spy, not counted (the sampling slows it)
            v = by_name["gateway+mask"]
            spy = start_profile(args.profile, gpid)
            if spy is not None:
                secs, _, err = run_psql(psql, v, sql, outdir / "profile.out")
                (outdir / "profile.out").unlink(missing_ok=True)
                profile = stop_profile(spy, args.profile)
                log(f"profiled masked run: {fmt(secs, '.2f')}s {err.strip()}")

        slow = None
        if args.slow:
            ssql = query_sql(args.slow_rows)
            log(f"slow client: {args.slow_rows} masked rows at {args.slow_rate / 1e6:.1f} MB/s")
            if can_reset:
                reset_hwm(gpid)
            sampler = RssSampler(gpid)
            sampler.start()
            try:
                n, secs, sample, err = slow_stream(gw.host, gw.port, "agent", ssql, args.slow_rate)
            finally:
                sampler.stop()
            peak = proc_status(gpid).get("VmHWM", 0)
            problem = err
            if not problem and n != args.slow_rows:
                problem = f"{n} rows instead of {args.slow_rows}"
            for row in sample:
                if not problem and (len(row) != 5 or not (row[1] or b"").startswith(b"***")
                                    or row[1] in raw_emails or row[2] in raw_phones):
                    problem = f"not masked: {row!r}"
            if problem:
                failed = True
                log(f"slow client: FAILED: {problem}")
            rss = [s for _, s in sampler.samples]
            slow = (n, secs, peak, rss, sampler.samples)
            log(f"slow client: {n} rows in {secs:.1f}s, gateway RSS {mb(min(rss)):.1f}-{mb(max(rss)):.1f} MB "
                f"over {len(rss)} samples, peak {mb(peak):.1f} MB")

        hwm_life = proc_status(gpid).get("VmHWM")
        report(variants, args, sql, base_rss, hwm_life, can_reset, slow)
        if profile:
            print(profile)
        return 1 if failed else 0
    except RuntimeError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        stop_all(started, pg, tmp)
        if outdir != tmp:
            shutil.rmtree(outdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def report(variants: list[Variant], args, sql: str, base_rss, hwm_life, can_reset: bool, slow) -> None:
    by = {v.name: v for v in variants}
    med = {v.name: median(v.secs) for v in variants}
    rps = {n: (args.rows / s if s == s and s > 0 else float("nan")) for n, s in med.items()}
    pgb = rps.get("pgbouncer", float("nan"))
    head = ["variant", "rows", "seconds", "rows/s", "vs pgbouncer", "vs direct", "wall s",
            "pooler CPU s", "gateway peak RSS MB"]
    rows = []
    for v in variants:
        rows.append([v.name, str(args.rows), fmt(med[v.name], ".2f"), fmt(rps[v.name]),
                     fmt(ratio(rps[v.name], pgb), ".2f"), fmt(ratio(rps[v.name], rps["direct"]), ".2f"),
                     fmt(median(v.wall), ".2f"),
                     fmt(median(v.cpu), ".2f") if v.pooler_pid else "-",
                     fmt(mb(max(v.peak_kb)), ".1f") if v.peak_kb else "-"])
    if slow is not None:
        n, secs, peak, rss, _ = slow
        r = n / secs if secs > 0 else float("nan")
        rows.append(["gateway+mask slow", str(n), fmt(secs, ".2f"), fmt(r), "-", "-", "-", "-",
                     fmt(mb(peak), ".1f")])
    print()
    print(f"{args.rows} rows per run ({sql}), psql -At, median of {args.rounds} round(s); "
          f"seconds = until the last row arrived (psql \\timing), wall = psql process incl. printing")
    _table(head, rows)
    print()
    gwu, gwm = rps.get("gateway"), rps.get("gateway+mask")
    print(f"gateway (unmasked) / pgbouncer: {fmt(ratio(gwu, pgb), '.2f')}   (aim >= 0.8)")
    print(f"gateway+mask / gateway:         {fmt(ratio(gwm, gwu), '.2f')}")
    peak_masked = max(by["gateway+mask"].peak_kb, default=0)
    if slow is not None:
        peak_masked = max(peak_masked, slow[2])
    print(f"gateway peak RSS while masking: {fmt(mb(peak_masked), '.1f')} MB   (aim < 100 MB)"
          + ("" if can_reset else "  [lifetime peak: VmHWM could not be reset]"))
    print(f"gateway RSS after warm-up: {fmt(mb(base_rss), '.1f')} MB; lifetime peak (VmHWM): "
          f"{fmt(mb(hwm_life), '.1f')} MB")
    if slow is not None:
        n, secs, peak, rss, samples = slow
        step = max(1, len(samples) // 10)
        print(f"slow client ({args.slow_rate / 1e6:.1f} MB/s, {n} rows, {secs:.1f}s): gateway VmRSS "
              f"min {mb(min(rss)):.1f} / max {mb(max(rss)):.1f} MB; samples (s: MB): "
              + ", ".join(f"{t:.0f}: {mb(k):.1f}" for t, k in samples[::step]))
    if args.rounds > 1:
        print()
        print("all rounds (seconds until the last row):")
        for v in variants:
            extra = ("   peak RSS MB " + "/".join(f"{mb(k):.1f}" for k in v.peak_kb)) if v.peak_kb else ""
            print(f"  {v.name:13} " + "/".join(fmt(s, ".2f") for s in v.secs) + extra)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())

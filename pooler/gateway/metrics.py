"""Prometheus metrics, /healthz and /readyz, served off the proxy loop (``metrics_listen``).

Rules this module keeps:
- The proxy loop only counts: the observer adds to plain numbers and to prometheus-client
  children it has cached (its values are lock-protected, so the HTTP thread may read them).
  Formatting (``generate_latest``, milliseconds for a few hundred series) happens in the HTTP
  server's thread; the few figures that live in the gateway's objects (clients and servers per
  pool) are read on the loop by one short call per scrape.
- Label values are bounded: pools, rule files, actions, masking methods, SQLSTATEs; free-text
  reasons of failed logins are reduced to their first words and capped in number.
- With no ``metrics_listen`` none of this is subscribed: nothing is counted.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import http.server
import logging
import socket
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .. import __version__
from ..protocol.messages import TX_IDLE
from .events import Observer

log = logging.getLogger("pooler.metrics")

# seconds; query/transaction durations and waits of a pooler span 100 us to minutes
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0)
APPROVAL_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)  # a human decides
MAX_REASONS = 50  # distinct failed-login reasons kept as labels; the rest count as "other"


class _Hist:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.total += v

    def buckets(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, n in zip((*(str(b) for b in self.bounds), "+Inf"), self.counts):
            acc += n
            out.append((bound, acc))
        return out


def reason_label(reason: str) -> str:
    """A failed login's reason, bounded: its first clause, without names and values."""
    head = reason.split(":", 1)[0].split("(", 1)[0].strip()
    return " ".join(w for w in head.split()[:6] if not w.startswith(("'", '"')))[:60] or "other"


class Metrics(Observer):
    trusted = True

    def __init__(self, gw) -> None:
        self.gw = gw
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self._masked = Counter("pooler_masked_values_total", "Values masked in results, by masking method",
                               ["method"], registry=r)
        self._refusals = Counter("pooler_refusals_total", "Requests the gateway refused itself, by SQLSTATE",
                                 ["sqlstate"], registry=r)
        self._logins = Counter("pooler_logins_total", "Successful logins, by database and authentication method",
                               ["database", "auth_method"], registry=r)
        self._failed = Counter("pooler_failed_logins_total", "Failed logins, by reason", ["reason"], registry=r)
        self.rule_reloads = Counter("pooler_rule_reloads_total", "Rule set loads after start, by result",
                                    ["result"], registry=r)
        self._approvals = Counter("pooler_approval_requests_total",
                                  "Statements held for approval, by how their request ended "
                                  "(approved, denied, expired, withdrawn)", ["outcome"], registry=r)
        self._approval_wait = _Hist(APPROVAL_BUCKETS)  # seconds from held to decided
        Gauge("pooler_info", "The gateway's version", ["version"], registry=r).labels(__version__).set(1)
        self._children: dict[tuple, object] = {}
        self._reasons: set[str] = set()
        self._hist: dict[tuple[str, str], tuple[_Hist, _Hist, _Hist]] = {}  # pool -> query, xact, wait
        self._open: dict[object, float] = {}
        r.register(_PoolCollector(self))
        self._server: http.server.ThreadingHTTPServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- events (on the loop)

    def _child(self, metric, *labels):
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            if len(self._children) > 10_000:
                self._children.clear()
            c = self._children[key] = metric.labels(*labels)
        return c

    def _hists(self, pool) -> tuple[_Hist, _Hist, _Hist]:
        h = self._hist.get(pool.key)
        if h is None:
            h = self._hist[pool.key] = (_Hist(), _Hist(), _Hist())
        return h

    def login(self, s) -> None:
        self._child(self._logins, s.database, s.auth_method or "trust").inc()

    def login_failed(self, s, reason: str) -> None:
        label = reason_label(reason)
        if label not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                label = "other"
            else:
                self._reasons.add(label)
        self._child(self._failed, label).inc()

    def refused(self, s, sqlstate: str, message: str, what) -> None:
        self._child(self._refusals, sqlstate).inc()

    def masked(self, s, report) -> None:
        for _, method, n in report:
            if n:
                self._child(self._masked, method).inc(n)

    def server_assigned(self, s, srv, waited: float) -> None:
        self._hists(s.pool)[2].observe(waited)

    def ready(self, s, srv, status: int, started: float, sent: int, received: int) -> None:
        now = time.monotonic()
        q, x, _ = self._hists(s.pool)
        q.observe(now - started)
        if status == TX_IDLE:
            x.observe(now - self._open.pop(s, started))
        elif s not in self._open:
            self._open[s] = started

    def logout(self, s, reason: str) -> None:
        self._open.pop(s, None)

    def hold_ended(self, s, request) -> None:
        self._child(self._approvals, request.state).inc()
        self._approval_wait.observe(max(0.0, request.decided_at - request.created))

    # -- what only the loop may read

    def _snapshot(self) -> dict:
        gw = self.gw
        pools = {}
        for p in gw.pools.values():
            linked = sum(1 for srv in p.active if srv.client is not None)
            pools[p.key] = {"cl_waiting": len(p.waiters), "sv_active": linked, "sv_idle": len(p.idle),
                            "sv_used": len(p.active) - linked, "sv_login": p.connecting}
        for c in gw.clients:
            if c.pool is not None and not c.closed and not c.waiting and c.state_name() != "login":
                d = pools.setdefault(c.pool.key, {"cl_waiting": 0, "sv_active": 0, "sv_idle": 0, "sv_used": 0,
                                                  "sv_login": 0})
                d["cl_active"] = d.get("cl_active", 0) + 1
        hist = {k: tuple((h.buckets(), h.total) for h in v) for k, v in self._hist.items()}
        decisions = {k: v[0] for k, v in gw.decisions.by_rule.items()}  # observers.Decisions counts them
        shadow = {k: v[0] for k, v in gw.decisions.shadow_by_rule.items()}
        audit = gw.audit.figures() if gw.audit is not None else {}
        return {"pools": pools, "counters": gw.stats.current(), "hist": hist, "decisions": decisions,
                "shadow": shadow, "audit": audit,
                "clients": len(gw.clients), "stopping": gw.stopping is not None,
                "approvals_pending": len(gw.approvals.book.pending),
                "grants_active": sum(1 for g in gw.approvals.book.grants.values() if g.active(time.time())),
                "approval_wait": (self._approval_wait.buckets(), self._approval_wait.total)}

    def _on_loop(self, fn, timeout: float = 2.0):
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - reported to the HTTP thread
                fut.set_exception(e)
        self._loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    # -- the HTTP server (its own threads)

    def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self._loop = asyncio.get_running_loop()
        metrics = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        code, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)
                    elif path == "/healthz":
                        code, ctype, body = metrics.health()
                    elif path == "/readyz":
                        code, ctype, body = metrics.readiness()
                    else:
                        code, ctype, body = 404, "text/plain", b"not found: /metrics, /healthz, /readyz\n"
                except Exception as e:  # noqa: BLE001 - a scrape never takes the gateway down
                    log.warning("metrics request %s failed: %s", path, e)
                    code, ctype, body = 503, "text/plain", f"unavailable: {type(e).__name__}\n".encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on http://%s:%s/metrics (/healthz, /readyz)", host or "0.0.0.0", port)

    def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is not None:
            threading.Thread(target=lambda: (srv.shutdown(), srv.server_close()), daemon=True).start()

    def health(self) -> tuple[int, str, bytes]:
        try:
            self._on_loop(lambda: None, timeout=1.0)
        except Exception:  # noqa: BLE001 - the loop does not answer
            return 503, "text/plain", b"event loop not answering\n"
        return 200, "text/plain", b"ok\n"

    def readiness(self) -> tuple[int, str, bytes]:
        """Ready: listening, and every configured database's server reachable (a TCP or Unix
        socket connect, no login)."""
        try:
            state = self._on_loop(lambda: (self.gw.stopping is not None, bool(self.gw.listeners),
                                           [(d.name, d.host, d.port) for d in self.gw.config.databases.values()
                                            if d.name != "*"]), timeout=1.0)
        except Exception:  # noqa: BLE001
            return 503, "text/plain", b"event loop not answering\n"
        stopping, listening, dbs = state
        problems = []
        if stopping:
            problems.append("shutting down")
        if not listening:
            problems.append("not listening")
        for name, hosts, port in dbs:
            for host in hosts.split(","):  # every host of a list must be up (PgBouncer's rule)
                problem = self._reachable(name, host, port)
                if problem:
                    problems.append(problem)
        if problems:
            return 503, "text/plain", ("not ready: " + "; ".join(problems) + "\n").encode()
        return 200, "text/plain", b"ready\n"

    @staticmethod
    def _reachable(name: str, host: str, port: int) -> str | None:
        try:
            if host.startswith("/"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1.0)
                    s.connect(f"{host}/.s.PGSQL.{port}")
            else:
                socket.create_connection((host, port), timeout=1.0).close()
        except OSError as e:
            return f"database {name}: {host}:{port} unreachable ({e.strerror or e})"
        return None


class _PoolCollector:
    """The per-pool figures, read from the loop at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        snap = self.metrics._on_loop(self.metrics._snapshot)
        labels = ["database", "user"]
        clients = GaugeMetricFamily("pooler_clients", "Client sessions per pool and state", labels=labels + ["state"])
        servers = GaugeMetricFamily("pooler_servers", "Server connections per pool and state",
                                    labels=labels + ["state"])
        for (db, user), d in sorted(snap["pools"].items()):
            clients.add_metric([db, user, "active"], d.get("cl_active", 0))
            clients.add_metric([db, user, "waiting"], d["cl_waiting"])
            for st in ("active", "idle", "used", "login"):
                servers.add_metric([db, user, st], d[f"sv_{st}"])
        yield clients
        yield servers
        fams = {name: CounterMetricFamily(f"pooler_{name}", doc, labels=labels) for name, doc in (
            ("transactions", "Transactions (rounds ending at ReadyForQuery 'I')"),
            ("queries", "Queries (rounds ending at ReadyForQuery)"),
            ("received_bytes", "Bytes received from clients"),
            ("sent_bytes", "Bytes received from servers and sent on"),
            ("server_assignments", "Servers linked to clients"))}
        for (db, user), c in sorted(snap["counters"].items()):
            fams["transactions"].add_metric([db, user], c.xact_count)
            fams["queries"].add_metric([db, user], c.query_count)
            fams["received_bytes"].add_metric([db, user], c.client_bytes)
            fams["sent_bytes"].add_metric([db, user], c.server_bytes)
            fams["server_assignments"].add_metric([db, user], c.server_assignment_count)
        yield from fams.values()
        hists = [HistogramMetricFamily(f"pooler_{n}_seconds", doc, labels=labels) for n, doc in (
            ("query_duration", "Query duration: the first request of a round sent to its ReadyForQuery"),
            ("transaction_duration", "Transaction duration: a transaction's first request to ReadyForQuery 'I'"),
            ("wait", "Time clients waited for a server"))]
        for (db, user), per in sorted(snap["hist"].items()):
            for fam, (buckets, total) in zip(hists, per):
                fam.add_metric([db, user], buckets, total)
        yield from hists
        decisions = CounterMetricFamily("pooler_decisions", "Statements the rules judged, by rule and action",
                                        labels=["rule", "action"])
        for (rule, action), n in sorted(snap["decisions"].items()):
            decisions.add_metric([rule or "(default_action)", action], n)
        yield decisions
        shadow = CounterMetricFamily("pooler_shadow_decisions", "What rule files in MODE = \"shadow\" would have "
                                     "decided (never enforced), by rule and action (error: the shadow rule failed)",
                                     labels=["rule", "action"])
        for (rule, action), n in sorted(snap["shadow"].items()):
            shadow.add_metric([rule, action], n)
        yield shadow
        audit = {name: CounterMetricFamily(f"pooler_audit_events_{name}", doc, labels=["destination"]) for name, doc in (
            ("sent", "Audit events delivered, by destination (file, syslog, http)"),
            ("dropped", "Audit events dropped because the destination's queue was full"),
            ("failed", "Audit events given up on after the destination failed (retries exhausted)"))}
        for dest, figures in sorted(snap["audit"].items()):
            for name, fam in audit.items():
                fam.add_metric([dest], figures[name])
        yield from audit.values()
        yield GaugeMetricFamily("pooler_client_connections", "Client connections, logging in included",
                                value=snap["clients"])
        yield GaugeMetricFamily("pooler_approvals_pending", "Statements waiting for approval now",
                                value=snap["approvals_pending"])
        yield GaugeMetricFamily("pooler_approval_grants_active", "Grants (APPROVE ... FOR) in force now",
                                value=snap["grants_active"])
        wait = HistogramMetricFamily("pooler_approval_wait_seconds", "Time held statements waited for their decision")
        wait.add_metric([], *snap["approval_wait"])
        yield wait
        rec = self.metrics.gw.recorder
        if rec is not None:  # the writer's counters: plain numbers its thread sets, read as they are
            w = rec.writer
            for name, doc, v in (
                    ("records", "Recording records written (file and close records included)", w.records),
                    ("bytes", "Recording bytes written, before compression", w.bytes),
                    ("write_failures", "Failed attempts to write recordings", w.failures),
                    ("lost", "Records that could not be written", w.lost)):
                yield CounterMetricFamily(f"pooler_recording_{name}", doc, value=v)
            yield GaugeMetricFamily("pooler_recording_queue_depth", "Records encoded and not yet written",
                                    value=w.queued + rec.nbuf)
            yield GaugeMetricFamily("pooler_recording_blocked", "1 while statements are refused because "
                                    "recordings cannot be written (record_failure = block)",
                                    value=1 if self.metrics.gw.record_block is not None else 0)

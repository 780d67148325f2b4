"""The native Prometheus endpoint (metrics_listen): /metrics figures that match what clients
did, /healthz and /readyz, scraped over HTTP from a real gateway process."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pooler.pgcluster import seed_demo
from tests.conftest import upstream_entry
from tests.gwproc import free_port

REPO = Path(__file__).resolve().parent.parent
RULES = 'def on_statement(stmt, session):\n    if stmt.command == "DELETE":\n        return deny("no deletes")\n'


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(metrics, name: str, **labels) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def mgw(pg, gw_factory, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10_test.star").write_text(RULES)
    port = free_port()
    g = gw_factory(settings={"metrics_listen": f"127.0.0.1:{port}", "rules_dir": str(rules),
                             "auth_type": "md5"},
                   auth_users={pg.superuser: "pw"}, databases={"postgres": upstream_entry(pg)})
    g.metrics_port = port
    return g


def test_metrics_count_what_the_clients_did(mgw, pg):
    user = pg.superuser
    with psycopg.connect(mgw.dsn(user=user, password="pw"), autocommit=True, prepare_threshold=None) as a:
        for _ in range(5):
            a.execute("SELECT 1")
        for _ in range(2):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                a.execute("DELETE FROM pg_class WHERE false")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(mgw.dsn(user=user, password="wrong"))
        m = scrape(mgw.metrics_port)
        pool = {"database": "postgres", "user": user}
        assert value(m, "pooler_queries_total", **pool) == 5
        assert value(m, "pooler_transactions_total", **pool) == 5
        assert value(m, "pooler_query_duration_seconds_count", **pool) == 5
        assert value(m, "pooler_transaction_duration_seconds_count", **pool) == 5
        assert value(m, "pooler_wait_seconds_count", **pool) == value(m, "pooler_server_assignments_total", **pool) == 5
        assert value(m, "pooler_query_duration_seconds_bucket", **pool, le="+Inf") == 5
        assert value(m, "pooler_received_bytes_total", **pool) > 0 and value(m, "pooler_sent_bytes_total", **pool) > 0
        assert value(m, "pooler_clients", **pool, state="active") == 1
        assert value(m, "pooler_clients", **pool, state="waiting") == 0
        assert value(m, "pooler_servers", **pool, state="idle") == 1
        assert value(m, "pooler_decisions_total", rule="rules/10_test.star", action="deny") == 2
        assert value(m, "pooler_decisions_total", rule="(default_action)", action="allow") == 5
        assert value(m, "pooler_refusals_total", sqlstate="42501") == 2
        assert value(m, "pooler_logins_total", database="postgres", auth_method="md5") == 1
        assert value(m, "pooler_failed_logins_total", reason="wrong password") == 1
        assert value(m, "pooler_info", version=__import__("pooler").__version__) == 1


def test_rule_reloads_are_counted_by_result(mgw, tmp_path):
    rules = tmp_path / "rules"
    mgw.signal(signal.SIGHUP)
    mgw.wait_log("rules loaded: 1 file")  # the reload's line (start logs "rules loaded from")
    (rules / "20_broken.star").write_text("def on_statement(stmt, session):\n    return (\n")
    mgw.signal(signal.SIGHUP)
    mgw.wait_log("rules not reloaded")
    m = scrape(mgw.metrics_port)
    assert value(m, "pooler_rule_reloads_total", result="ok") == 1
    assert value(m, "pooler_rule_reloads_total", result="failed") == 1


def test_masked_values_are_counted_by_method(pg, gw_factory):
    seed_demo(pg, "metrics_shop")
    port = free_port()
    g = gw_factory(settings={"metrics_listen": f"127.0.0.1:{port}", "rules_dir": str(REPO / "rules")},
                   databases={"metrics_shop": upstream_entry(pg, "metrics_shop")}, users={"agent": "groups=agents"})
    with psycopg.connect(g.dsn(user="agent", dbname="metrics_shop"), autocommit=True) as a:
        rows = a.execute("SELECT email, phone FROM customers ORDER BY id LIMIT 4").fetchall()
        assert len(rows) == 4 and all("***" in r[0] for r in rows)
    m = scrape(port)
    assert value(m, "pooler_masked_values_total", method="email") == 4
    assert value(m, "pooler_masked_values_total", method="partial") == 4


def test_healthz_readyz_and_unknown_paths(mgw):
    assert get(mgw.metrics_port, "/healthz") == (200, "ok\n")
    assert get(mgw.metrics_port, "/readyz") == (200, "ready\n")
    status, body = get(mgw.metrics_port, "/nothing")
    assert status == 404 and "/metrics" in body


def test_readyz_says_which_database_cannot_be_reached(pg, gw_factory):
    dead = free_port()
    port = free_port()
    gw_factory(settings={"metrics_listen": f"127.0.0.1:{port}"},
               databases={"postgres": upstream_entry(pg), "gone": f"host=127.0.0.1 port={dead} dbname=gone"})
    status, body = get(port, "/readyz")
    assert status == 503 and "database gone" in body and f"127.0.0.1:{dead}" in body
    assert get(port, "/healthz")[0] == 200  # alive, only not ready


def test_a_bad_metrics_listen_is_a_config_error(gw_factory):
    g = gw_factory(settings={"metrics_listen": "localhost"}, start=False)
    with pytest.raises(RuntimeError, match="metrics_listen"):
        g.start()


def test_the_grafana_dashboard_reads_only_metrics_the_gateway_exports(mgw, pg):
    import json
    import re

    with psycopg.connect(mgw.dsn(user=pg.superuser, password="pw"), autocommit=True) as a:
        a.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("DELETE FROM pg_class WHERE false")
    mgw.signal(signal.SIGHUP)
    mgw.wait_log("rules loaded: 1 file")
    exported = {name for name, _ in scrape(mgw.metrics_port)}
    dash = json.loads((REPO / "conf" / "grafana-dashboard.json").read_text())
    used = {n for p in dash["panels"] for t in p["targets"] for n in re.findall(r"pooler_[a-z_]+", t["expr"])}
    used |= {n for v in dash["templating"]["list"] for n in re.findall(r"pooler_[a-z_]+", v.get("query", ""))}
    # masked values and failed logins have no series until something is masked or refused
    assert used - exported <= {"pooler_masked_values_total", "pooler_failed_logins_total"}
    assert used & exported

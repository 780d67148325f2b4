"""PgBouncer's admin console on the virtual database pgbouncer: its result columns exactly as
PgBouncer 1.25 sends them, figures that match what the test did, and the commands operators run
(PAUSE, RESUME, DISABLE, ENABLE, KILL, KILL_CLIENT, RECONNECT, WAIT_CLOSE, SUSPEND, SET, RELOAD,
SHUTDOWN), driven with psql and psycopg as scripts do."""

from __future__ import annotations

import subprocess
import threading

import psycopg
import pytest

from tests.conftest import upstream_entry

ADMIN = {"admin_users": "admin", "stats_users": "watcher"}

# PgBouncer 1.25.2's columns (src/admin.c, src/stats.c), type letters as there: s text, i int4,
# q int8, N numeric, T timestamp sent as text, b bytea
_SOCKET = ("type:s user:s database:s replication:s state:s addr:s port:i local_addr:s local_port:i "
           "connect_time:T request_time:T wait:i wait_us:i close_needed:i ptr:s link:s remote_pid:i tls:s "
           "application_name:s prepared_statements:i id:i")
_DEBUG = " recv_pos:i pkt_pos:i pkt_remain:i send_pos:i send_remain:i pkt_avail:i send_avail:i"
_TOTALS = ("server_assignment_count xact_count query_count {recv} {sent} xact_time query_time wait_time "
           "{p}client_parse_count {p}server_parse_count {p}bind_count")
PGBOUNCER_125 = {
    "POOLS": "database:s user:s cl_active:i cl_waiting:i cl_active_cancel_req:i cl_waiting_cancel_req:i "
             "sv_active:i sv_active_cancel:i sv_being_canceled:i sv_idle:i sv_used:i sv_tested:i sv_login:i "
             "maxwait:i maxwait_us:i pool_mode:s load_balance_hosts:s",
    "DATABASES": "name:s host:s port:i database:s force_user:s pool_size:i min_pool_size:i reserve_pool_size:i "
                 "server_lifetime:i pool_mode:s load_balance_hosts:s max_connections:i current_connections:i "
                 "max_client_connections:i current_client_connections:i paused:i disabled:i",
    "CLIENTS": _SOCKET, "SERVERS": _SOCKET, "SOCKETS": _SOCKET + _DEBUG, "ACTIVE_SOCKETS": _SOCKET + _DEBUG,
    "USERS": "name:s pool_size:s reserve_pool_size:s pool_mode:s max_user_connections:i current_connections:i "
             "max_user_client_connections:i current_client_connections:i",
    "LISTS": "list:s items:i",
    "MEM": "name:s size:i used:i free:i memtotal:i",
    "STATE": "key:s value:s",
    "CONFIG": "key:s value:s default:s changeable:s",
    "VERSION": "version:s",
    "PEERS": "peer_id:i host:s port:i pool_size:i",
    "PEER_POOLS": "peer_id:i cl_active_cancel_req:i cl_waiting_cancel_req:i sv_active_cancel:i sv_login:i",
    "DNS_HOSTS": "hostname:s ttl:q addrs:s",
    "DNS_ZONES": "zonename:s serial:q count:i",
    "FDS": "fd:i task:s user:s database:s addr:s port:i cancel:q link:i client_encoding:s std_strings:s "
           "datestyle:s timezone:s password:s scram_client_key:b scram_server_key:b",
    "STATS": "database:s " + " ".join(f"total_{n}:N" for n in _TOTALS.format(
        recv="received", sent="sent", p="").split()) + " " + " ".join(f"avg_{n}:N" for n in _TOTALS.format(
            recv="recv", sent="sent", p="").split()),
    "STATS_TOTALS": "database:s " + " ".join(f"{n}:N" for n in _TOTALS.format(
        recv="bytes_received", sent="bytes_sent", p="").split()),
    "STATS_AVERAGES": "database:s " + " ".join(f"{n}:N" for n in _TOTALS.format(
        recv="bytes_received", sent="bytes_sent", p="avg_").split()),
    "TOTALS": "name:s value:N",
}
OIDS = {"s": 25, "T": 25, "i": 23, "q": 20, "N": 1700, "b": 17}


@pytest.fixture
def cgw(pg, gw_factory):
    return gw_factory(settings=ADMIN, databases={"postgres": upstream_entry(pg)})


def console(g, user: str = "admin") -> psycopg.Connection:
    return psycopg.connect(g.dsn(user=user, dbname="pgbouncer"), autocommit=True, prepare_threshold=None)


def show(conn, what: str) -> list[dict]:
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def psql_console(g, sql: str, user: str = "admin") -> subprocess.CompletedProcess:
    return subprocess.run(["psql", g.dsn(user=user, dbname="pgbouncer"), "-XAtc", sql],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("what", sorted(PGBOUNCER_125))
def test_every_show_has_pgbouncer_125s_columns_and_types(cgw, what):
    with console(cgw) as conn:
        cur = conn.execute(f"SHOW {what}")
        got = [f"{d.name}:{d.type_code}" for d in cur.description]
    want = [f"{c.split(':')[0]}:{OIDS[c.split(':')[1]]}" for c in PGBOUNCER_125[what].split()]
    assert got == want


def test_the_figures_are_what_the_clients_did(cgw, pg):
    with psycopg.connect(cgw.dsn(application_name="worker-1"), autocommit=True) as a, \
            psycopg.connect(cgw.dsn(application_name="worker-2"), autocommit=True) as b, console(cgw) as c:
        for _ in range(4):
            a.execute("SELECT 1")
        with b.transaction():
            pid = b.execute("SELECT pg_backend_pid()").fetchone()[0]
            pools = {(p["database"], p["user"]): p for p in show(c, "POOLS")}
            pool = pools[("postgres", pg.superuser)]
            # b holds the server a used (it went back to the pool after each of a's statements)
            assert (pool["cl_active"], pool["cl_waiting"], pool["sv_active"], pool["sv_idle"]) == (2, 0, 1, 0)
            assert pool["pool_mode"] == "transaction"
            assert pools[("pgbouncer", "pgbouncer")]["cl_active"] == 1
            servers = show(c, "SERVERS")
            linked = [s for s in servers if s["state"] == "active"]
            assert [s["remote_pid"] for s in linked] == [pid]
            clients = {r["application_name"]: r for r in show(c, "CLIENTS")}
            assert clients["worker-2"]["state"] == "active" and clients["worker-1"]["state"] == "idle"
            assert clients["worker-2"]["link"] == linked[0]["ptr"]
        stats = {r["database"]: r for r in show(c, "STATS")}
        # a: 4 one-round transactions; b: BEGIN, SELECT, COMMIT in one transaction
        assert (stats["postgres"]["total_xact_count"], stats["postgres"]["total_query_count"]) == (5, 7)
        assert stats["postgres"]["total_server_assignment_count"] == 5
        assert stats["postgres"]["total_received"] > 0 and stats["postgres"]["total_sent"] > 0
        totals = dict((r["name"], r["value"]) for r in show(c, "TOTALS"))
        assert totals["total_xact_count"] >= 5
        dbs = {r["name"]: r for r in show(c, "DATABASES")}
        assert dbs["postgres"]["current_connections"] == 1 and dbs["postgres"]["pool_size"] == 5
        assert dbs["postgres"]["current_client_connections"] == 2 and dbs["pgbouncer"]["force_user"] == "pgbouncer"
        assert dict((r["list"], r["items"]) for r in show(c, "LISTS"))["used_clients"] == 3
        assert show(c, "VERSION")[0]["version"].startswith("PgBouncer 1.25.2")
        config = {r["key"]: r for r in show(c, "CONFIG")}
        assert config["default_pool_size"]["value"] == "5" and config["default_pool_size"]["default"] == "20"
        assert config["listen_port"]["changeable"] == "no"


def test_who_may_use_the_console(cgw):
    out = psql_console(cgw, "SHOW DATABASES", user="watcher")
    assert out.returncode == 0 and "postgres" in out.stdout
    out = psql_console(cgw, "PAUSE", user="watcher")
    assert "admin access needed" in out.stderr
    out = psql_console(cgw, "SHOW FDS", user="watcher")
    assert "admin access needed" in out.stderr
    out = psql_console(cgw, "SHOW POOLS", user="somebody")
    assert out.returncode != 0 and "not allowed" in out.stderr
    with console(cgw) as c:
        with pytest.raises(psycopg.errors.ProtocolViolation, match="invalid command 'SELECT now\\(\\) FROM x'"):
            c.execute("SELECT now() FROM x")
        assert c.execute("SHOW client_encoding").fetchone() == ("UTF-8",)  # PgBouncer's fake parameters
        with pytest.raises(psycopg.OperationalError, match="extended query protocol not supported"):
            c.execute("SHOW %s", ("POOLS",))


def test_a_password_login_to_the_console_checks_the_password(pg, gw_factory):
    g = gw_factory(settings={**ADMIN, "auth_type": "md5"}, auth_users={"admin": "s3cret"})
    ok = subprocess.run(["psql", g.dsn(user="admin", dbname="pgbouncer", password="s3cret"), "-XAtc", "SHOW STATE"],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "active|yes" in ok.stdout
    bad = subprocess.run(["psql", g.dsn(user="admin", dbname="pgbouncer", password="wrong"), "-XAtc", "SHOW STATE"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "password authentication failed" in bad.stderr


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_pause_waits_for_running_transactions_and_resume_lets_waiting_clients_go(cgw):
    with psycopg.connect(cgw.dsn(), autocommit=True) as busy, console(cgw) as c, console(cgw) as c2:
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        paused, box = _in_thread(lambda: c.execute("PAUSE").statusmessage)
        state = {}
        while state.get("paused") != "yes":  # the command runs on the gateway's loop: wait for it to take effect
            state = dict((r["key"], r["value"]) for r in show(c2, "STATE"))
        assert paused.is_alive()  # PAUSE answers only once the transaction is over
        busy.execute("COMMIT")
        paused.join(10)
        assert box == {"result": "PAUSE"}
        with psycopg.connect(cgw.dsn(), autocommit=True) as late:
            waiting, box2 = _in_thread(lambda: late.execute("SELECT 42").fetchone())
            pool = {}
            while pool.get("cl_waiting") != 1:
                pool = next(p for p in show(c2, "POOLS") if p["database"] == "postgres")
            assert pool["sv_active"] == 0 and pool["sv_idle"] == 0  # paused: servers closed
            c2.execute("RESUME")
            waiting.join(10)
            assert box2 == {"result": (42,)}
        with pytest.raises(psycopg.errors.ProtocolViolation, match="not paused"):
            c2.execute("RESUME")


def test_cancelling_a_waiting_pause_resumes(cgw):
    with psycopg.connect(cgw.dsn(), autocommit=True) as busy, console(cgw) as c, console(cgw) as c2:
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        t, box = _in_thread(lambda: c.execute("PAUSE"))
        while dict((r["key"], r["value"]) for r in show(c2, "STATE"))["paused"] != "yes":
            pass
        c.cancel()
        t.join(10)
        assert isinstance(box.get("error"), psycopg.errors.QueryCanceled)
        assert dict((r["key"], r["value"]) for r in show(c2, "STATE"))["active"] == "yes"
        busy.execute("COMMIT")


def test_disable_refuses_new_logins_and_enable_lets_them_in(cgw):
    with console(cgw) as c:
        c.execute("DISABLE postgres")
        assert next(r for r in show(c, "DATABASES") if r["name"] == "postgres")["disabled"] == 1
        with pytest.raises(psycopg.OperationalError, match='database "postgres" is disabled'):
            psycopg.connect(cgw.dsn())
        c.execute("ENABLE postgres")
        with psycopg.connect(cgw.dsn()) as ok:
            assert ok.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.ProtocolViolation, match="no such database: nope"):
            c.execute("DISABLE nope")
        with pytest.raises(psycopg.errors.ProtocolViolation, match="cannot disable admin db"):
            c.execute("DISABLE pgbouncer")


def test_kill_closes_a_databases_clients_and_leaves_it_paused(cgw):
    with psycopg.connect(cgw.dsn(), autocommit=True) as victim, console(cgw) as c:
        victim.execute("SELECT 1")
        c.execute("KILL postgres")
        with pytest.raises(psycopg.OperationalError, match="database removed"):
            victim.execute("SELECT 1")
        assert next(r for r in show(c, "DATABASES") if r["name"] == "postgres")["paused"] == 1
        with psycopg.connect(cgw.dsn(), autocommit=True) as late:
            t, box = _in_thread(lambda: late.execute("SELECT 7").fetchone())
            while next(p for p in show(c, "POOLS") if p["database"] == "postgres")["cl_waiting"] != 1:
                pass
            c.execute("RESUME postgres")
            t.join(10)
            assert box == {"result": (7,)}


def test_kill_client_ends_exactly_that_session(cgw):
    with psycopg.connect(cgw.dsn(application_name="doomed"), autocommit=True) as doomed, \
            psycopg.connect(cgw.dsn(application_name="spared"), autocommit=True) as spared, console(cgw) as c:
        ids = {r["application_name"]: r["id"] for r in show(c, "CLIENTS")}
        assert c.execute(f"KILL_CLIENT {ids['doomed']}").statusmessage == "KILL_CLIENT"
        with pytest.raises(psycopg.OperationalError, match="admin forced disconnect"):
            doomed.execute("SELECT 1")
        assert spared.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.ProtocolViolation, match="client not found"):
            c.execute(f"KILL_CLIENT {ids['doomed']}")


def test_reconnect_replaces_servers_and_wait_close_waits_for_the_linked_one(cgw):
    with psycopg.connect(cgw.dsn(), autocommit=True) as a, console(cgw) as c, console(cgw) as c2:
        a.execute("BEGIN")
        before = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        c.execute("RECONNECT postgres")
        assert [s["close_needed"] for s in show(c, "SERVERS")] == [1]  # the linked one; idle ones closed
        t, box = _in_thread(lambda: c2.execute("WAIT_CLOSE postgres").statusmessage)
        t.join(0.3)
        assert t.is_alive()  # not before the transaction lets its server go
        a.execute("COMMIT")
        t.join(10)
        assert box == {"result": "WAIT_CLOSE"}
        after = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert after != before


def test_set_changes_the_running_config_and_refuses_what_needs_a_restart(cgw):
    with console(cgw) as c:
        assert c.execute("SET default_pool_size = 3").statusmessage == "SET default_pool_size=3"
        assert c.execute("SHOW default_pool_size").fetchone() == ("3",)
        assert c.execute("SET server_reset_query = 'DISCARD ALL'").statusmessage.startswith("SET")
        with pytest.raises(psycopg.errors.ProtocolViolation, match="listen_port cannot be changed"):
            c.execute("SET listen_port = 7000")
        with pytest.raises(psycopg.errors.ProtocolViolation, match="invalid value for pool_mode"):
            c.execute("SET pool_mode = party")
        with pytest.raises(psycopg.errors.ProtocolViolation, match="unknown setting"):
            c.execute("SET no_such_key = 1")
    with psycopg.connect(cgw.dsn(), autocommit=True) as x:  # the gateway still serves
        assert x.execute("SELECT 1").fetchone() == (1,)


def test_reload_of_a_broken_file_is_refused_and_the_running_config_serves(cgw):
    text = cgw.ini.read_text()
    with console(cgw) as c:
        cgw.ini.write_text(text + "pool_mode = party\n")
        with pytest.raises(psycopg.Error, match="RELOAD failed") as err:
            c.execute("RELOAD")
        assert err.value.sqlstate == "F0000"
        cgw.ini.write_text(text.replace("default_pool_size = 5", "default_pool_size = 4"))
        assert c.execute("RELOAD").statusmessage == "RELOAD"
        assert c.execute("SHOW default_pool_size").fetchone() == ("4",)


def test_reload_keeps_the_running_value_of_every_setting_read_at_start(cgw, tmp_path):
    text = cgw.ini.read_text()
    with console(cgw) as c:
        before = {k: c.execute(f"SHOW {k}").fetchone()[0] for k in ("max_packet_size", "pidfile", "metrics_listen")}
        cgw.ini.write_text(text + f"max_packet_size = 65536\npidfile = {tmp_path / 'gw.pid'}\n"
                                  "metrics_listen = 127.0.0.1:1\ndefault_pool_size = 4\n")
        assert c.execute("RELOAD").statusmessage == "RELOAD"
        # what SHOW says is what runs: not the file's new values, which need a restart
        assert {k: c.execute(f"SHOW {k}").fetchone()[0] for k in before} == before
        assert c.execute("SHOW default_pool_size").fetchone() == ("4",)  # a reloadable one applies
    assert "max_packet_size, metrics_listen, pidfile: changes need a restart" in cgw.wait_log("need a restart")
    assert not (tmp_path / "gw.pid").exists()


def test_suspend_holds_every_client_until_resume(cgw):
    with psycopg.connect(cgw.dsn(), autocommit=True) as a, console(cgw) as c:
        a.execute("SELECT 1")
        assert c.execute("SUSPEND").statusmessage == "SUSPEND"
        assert dict((r["key"], r["value"]) for r in show(c, "STATE"))["suspended"] == "yes"
        t, box = _in_thread(lambda: a.execute("SELECT 5").fetchone())
        t.join(0.3)
        assert t.is_alive()  # its query is not read while suspended
        c.execute("RESUME")
        t.join(10)
        assert box == {"result": (5,)}


def test_shutdown_wait_for_clients_stops_once_the_last_client_leaves(cgw):
    with psycopg.connect(cgw.dsn(), autocommit=True) as a:
        out = psql_console(cgw, "SHUTDOWN WAIT_FOR_CLIENTS")
        assert out.returncode == 0 and out.stdout.strip() == "SHUTDOWN"
        assert a.execute("SELECT 1").fetchone() == (1,)  # a connected client keeps being served
        assert cgw.proc.poll() is None
    assert cgw.proc.wait(10) == 0


def test_shutdown_stops_at_once(cgw):
    with psycopg.connect(cgw.dsn(), autocommit=True) as a:
        psql_console(cgw, "SHUTDOWN")
        assert cgw.proc.wait(10) == 0
        with pytest.raises(psycopg.OperationalError):
            a.execute("SELECT 1")


def test_show_rules_and_decisions_count_what_the_rules_decided(pg, gw_factory, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10_no_deletes.star").write_text(
        'def on_statement(stmt, session):\n    if stmt.command == "DELETE":\n        return deny("no deletes")\n')
    g = gw_factory(settings={**ADMIN, "rules_dir": str(rules)})
    with psycopg.connect(g.dsn(), autocommit=True) as a:
        for _ in range(3):
            a.execute("SELECT 1")
        for _ in range(2):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                a.execute("DELETE FROM pg_class WHERE false")
    with console(g) as c:
        files = {r["file"]: r for r in show(c, "RULES")}
        assert files["rules/10_no_deletes.star"]["deny"] == 2
        assert files["(default_action)"]["allow"] == 3
        decisions = {(r["rule"], r["action"]): r for r in show(c, "DECISIONS")}
        assert decisions[("rules/10_no_deletes.star", "deny")]["count"] == 2
        assert decisions[("rules/10_no_deletes.star", "deny")]["last_reason"] == "no deletes"


def test_the_console_is_also_reached_as_pooler_and_by_psql_scripts(cgw):
    out = subprocess.run(["psql", cgw.dsn(user="admin", dbname="pooler"), "-XAtc", "SHOW STATE"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.split() == ["active|yes", "paused|no", "suspended|no"]


def test_the_debian_exporter_scrapes_the_console(pg, gw_factory, tmp_path):
    """prometheus-pgbouncer-exporter 1.7 (Debian) reads columns PgBouncer dropped in 1.8
    (total_requests) and renamed in 1.24 (reserve_pool): admin_legacy_columns adds them after
    the current ones. (Against Debian's own PgBouncer 1.18 this exporter fails at start.)"""
    import socket
    import time
    import urllib.request

    g = gw_factory(settings={**ADMIN, "admin_legacy_columns": "1"})
    with psycopg.connect(g.dsn(), autocommit=True, prepare_threshold=None) as a:  # six one-round queries
        for _ in range(6):
            a.execute("SELECT 1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        exporter = subprocess.Popen(
            ["prometheus-pgbouncer-exporter", "--host", "127.0.0.1", "--port", str(port),
             "--pgbouncer-host", "127.0.0.1", "--pgbouncer-port", str(g.port), "--pgbouncer-user", "admin"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            text = None
            while text is None:
                if exporter.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"exporter did not serve: {exporter.stdout.read().decode()[-2000:]}")
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                except OSError:
                    time.sleep(0.05)
        finally:
            exporter.kill()
            exporter.wait(5)
    metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("pgbouncer_")}
    assert metrics['pgbouncer_requests_total{database="postgres"}'] == 6
    assert metrics['pgbouncer_active_clients{database="postgres",user="postgres"}'] == 1
    assert metrics['pgbouncer_pool_size{database="postgres"}'] == 5
    assert metrics["pgbouncer_used_clients"] >= 1 and metrics['pgbouncer_received_bytes_total{database="postgres"}'] > 0

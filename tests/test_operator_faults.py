"""Faults an operator meets, each as PgBouncer 1.25 handles it, driven through the admin console
with psycopg and psql as scripts do: PAUSE while transactions run, RELOAD of a broken file or
broken rules, KILL of a database whose clients wait, SHUTDOWN WAIT_FOR_CLIENTS and
WAIT_FOR_SERVERS with clients idle, busy and waiting, and SHOW SERVERS while a server is still
logging in. (tests/test_admin_console.py pins the commands' plain cases.)"""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import psycopg
import pytest

from tests.conftest import upstream_entry
from tests.test_admin_console import ADMIN, _in_thread, console, show


def wait_for(what, cond, timeout: float = 15.0):
    """Poll ``cond`` until it returns something true (the gateway acts on its own loop)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def pool_of(c, db: str = "postgres") -> dict:
    return next((p for p in show(c, "POOLS") if p["database"] == db), {})


def state_of(c) -> dict:
    return dict((r["key"], r["value"]) for r in show(c, "STATE"))


@pytest.fixture
def cgw(pg, gw_factory):
    return gw_factory(settings=ADMIN, databases={"postgres": upstream_entry(pg)})


@pytest.fixture
def ugw(pg, gw_factory, tmp_path):
    """A gateway that also listens on a Unix socket (as PgBouncer keeps it during shutdown)."""
    sockdir = tmp_path / "sock"
    sockdir.mkdir()
    g = gw_factory(settings={**ADMIN, "unix_socket_dir": str(sockdir)}, databases={"postgres": upstream_entry(pg)})
    g.sockdir = str(sockdir)
    return g


def unix_dsn(g, user: str = "postgres", dbname: str = "postgres") -> str:
    return f"host={g.sockdir} port={g.port} dbname={dbname} user={user} connect_timeout=10"


def test_pause_waits_for_every_running_transaction_while_new_queries_wait(cgw_small):
    g = cgw_small
    with psycopg.connect(g.dsn(), autocommit=True) as t1, psycopg.connect(g.dsn(), autocommit=True) as t2, \
            psycopg.connect(g.dsn(), autocommit=True) as late, console(g) as c, console(g) as c2:
        for t in (t1, t2):
            t.execute("BEGIN")
            t.execute("SELECT 1")
        paused, box = _in_thread(lambda: c.execute("PAUSE").statusmessage)
        wait_for("PAUSE to take effect", lambda: state_of(c2)["paused"] == "yes")
        # a query that needs a server now waits, without one
        query, qbox = _in_thread(lambda: late.execute("SELECT 42").fetchone())
        wait_for("the late query to wait", lambda: pool_of(c2).get("cl_waiting") == 1)
        # the transactions run on: their clients keep their servers
        assert t1.execute("SELECT 2").fetchone() == (2,)
        t1.execute("COMMIT")
        wait_for("t1's server to close", lambda: pool_of(c2)["sv_active"] == 1)
        assert paused.is_alive() and "result" not in box  # t2 still runs its transaction
        t2.execute("COMMIT")
        paused.join(10)
        assert box == {"result": "PAUSE"}
        pool = pool_of(c2)
        assert (pool["sv_active"], pool["sv_idle"], pool["cl_waiting"]) == (0, 0, 1)  # no server left
        assert query.is_alive()
        c2.execute("RESUME")
        query.join(10)
        assert qbox == {"result": (42,)}


@pytest.fixture
def cgw_small(pg, gw_factory):
    return gw_factory(settings={**ADMIN, "default_pool_size": "2"}, databases={"postgres": upstream_entry(pg)})


def test_reload_of_a_broken_file_keeps_every_setting_and_says_why(cgw):
    text = cgw.ini.read_text()
    with psycopg.connect(cgw.dsn(), autocommit=True) as busy, console(cgw) as c:
        busy.execute("BEGIN")
        # a valid change and a broken line in the same file: neither is applied
        cgw.ini.write_text(text.replace("default_pool_size = 5", "default_pool_size = 4") + "pool_mode = party\n")
        with pytest.raises(psycopg.Error, match="RELOAD failed, see logs for additional details") as err:
            c.execute("RELOAD")
        assert err.value.sqlstate == "F0000"
        line = len(text.splitlines()) + 1
        log = cgw.wait_log("reload failed, keeping the running configuration")
        assert f"{cgw.ini}:{line}: invalid value for pool_mode" in log
        assert c.execute("SHOW default_pool_size").fetchone() == ("5",)
        assert c.execute("SHOW pool_mode").fetchone() == ("transaction",)
        assert busy.execute("SELECT 3").fetchone() == (3,)  # a running transaction is untouched
        busy.execute("COMMIT")
        cgw.ini.write_text("[databases\n")
        with pytest.raises(psycopg.Error, match="RELOAD failed"):
            c.execute("RELOAD")
        assert "malformed section header" in cgw.wait_log("malformed section header")
        with psycopg.connect(cgw.dsn(), autocommit=True) as fresh:  # logins still served
            assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_reload_with_broken_rules_fails_and_the_running_rules_keep_deciding(pg, gw_factory, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    rule = rules / "10_no_deletes.star"
    rule.write_text('def on_statement(stmt, session):\n    if stmt.command == "DELETE":\n'
                    '        return deny("no deletes")\n')
    g = gw_factory(settings={**ADMIN, "rules_dir": str(rules)})
    with console(g) as c, psycopg.connect(g.dsn(), autocommit=True) as a:
        rule.write_text("def on_statement(stmt, session:\n")
        with pytest.raises(psycopg.Error, match="RELOAD failed") as err:
            c.execute("RELOAD")
        assert err.value.sqlstate == "F0000"
        assert "10_no_deletes.star" in g.wait_log("rules not reloaded")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no deletes"):
            a.execute("DELETE FROM pg_class WHERE false")


def test_kill_ends_active_and_waiting_clients_and_the_pool_is_gone_until_resume(pg, gw_factory):
    g = gw_factory(settings={**ADMIN, "default_pool_size": "1"}, databases={"postgres": upstream_entry(pg)})
    holder = psycopg.connect(g.dsn(), autocommit=True)
    waiters = [psycopg.connect(g.dsn(), autocommit=True) for _ in range(2)]
    with console(g) as c:
        holder.execute("BEGIN")
        pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
        threads = [_in_thread(lambda w=w: w.execute("SELECT 1")) for w in waiters]
        wait_for("two clients waiting", lambda: pool_of(c).get("cl_waiting") == 2)
        assert c.execute("KILL postgres").statusmessage == "KILL"
        for t, box in threads:
            t.join(10)
            assert isinstance(box.get("error"), psycopg.OperationalError)
            assert "database removed" in str(box["error"])
        with pytest.raises(psycopg.OperationalError, match="database removed"):
            holder.execute("SELECT 1")
        assert pool_of(c) == {}  # the pool itself is gone
        assert [s for s in show(c, "SERVERS") if s["database"] == "postgres"] == []
        with psycopg.connect(pg.dsn()) as direct:  # its server connection closed, its transaction with it
            wait_for("the killed backend to end", lambda: direct.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == (0,))
        assert next(r for r in show(c, "DATABASES") if r["name"] == "postgres")["paused"] == 1
        with psycopg.connect(g.dsn(), autocommit=True) as late:  # a new login waits for RESUME to run anything
            t, box = _in_thread(lambda: late.execute("SELECT 7").fetchone())
            wait_for("the new client to wait", lambda: pool_of(c).get("cl_waiting") == 1)
            assert pool_of(c)["sv_active"] == 0
            c.execute("RESUME postgres")
            t.join(10)
            assert box == {"result": (7,)}
    for conn in [holder, *waiters]:
        conn.close()


def _refused(dsn: str) -> str:
    try:
        psycopg.connect(dsn).close()
    except psycopg.OperationalError as e:
        return str(e)
    raise AssertionError(f"{dsn}: login accepted")


def test_shutdown_wait_for_clients_with_idle_and_busy_clients(ugw):
    g = ugw
    busy = psycopg.connect(g.dsn(), autocommit=True)
    idle = psycopg.connect(g.dsn(), autocommit=True)
    busy.execute("BEGIN")
    busy.execute("SELECT 1")
    with console(g) as c:
        assert c.execute("SHUTDOWN WAIT_FOR_CLIENTS").statusmessage == "SHUTDOWN"
    assert "Connection refused" in _refused(g.dsn())  # TCP: no longer listening
    assert "pooler is shutting down" in _refused(unix_dsn(g))  # the Unix socket: no new logins
    with psycopg.connect(unix_dsn(g, "admin", "pgbouncer"), autocommit=True) as uc:  # but the console answers
        assert state_of(uc)["active"] == "yes"
        assert len([r for r in show(uc, "CLIENTS") if r["database"] == "postgres"]) == 2
        with pytest.raises(psycopg.errors.ProtocolViolation, match="pooler is shutting down"):
            uc.execute("RESUME")
    # both clients keep being served: the transaction ends, new ones start
    assert busy.execute("SELECT 2").fetchone() == (2,)
    busy.execute("COMMIT")
    assert busy.execute("SELECT 3").fetchone() == (3,)
    assert idle.execute("SELECT 4").fetchone() == (4,)
    busy.close()
    assert g.proc.poll() is None  # one client left
    assert idle.execute("SELECT 5").fetchone() == (5,)
    idle.close()
    assert g.proc.wait(10) == 0
    assert "waiting for clients to disconnect" in g.log() and "client connections dropped, exiting" in g.log()


def test_shutdown_wait_for_servers_lets_transactions_finish_and_disconnects_the_rest(pg, gw_factory, tmp_path):
    sockdir = tmp_path / "sock"
    sockdir.mkdir()
    g = gw_factory(settings={**ADMIN, "unix_socket_dir": str(sockdir), "default_pool_size": "1"},
                   databases={"postgres": upstream_entry(pg)})
    g.sockdir = str(sockdir)
    busy = psycopg.connect(g.dsn(), autocommit=True)
    idle = psycopg.connect(g.dsn(), autocommit=True)
    waiting = psycopg.connect(g.dsn(), autocommit=True)
    c = psycopg.connect(unix_dsn(g, "admin", "pgbouncer"), autocommit=True)
    try:
        idle.execute("SELECT 1")
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        t, box = _in_thread(lambda: waiting.execute("SELECT 1"))
        wait_for("a client waiting", lambda: pool_of(c).get("cl_waiting") == 1)
        out = subprocess.run(["psql", g.dsn(user="admin", dbname="pgbouncer"), "-XAtc", "SHUTDOWN WAIT_FOR_SERVERS"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "SHUTDOWN"
        t.join(10)
        assert "server shutting down" in str(box.get("error"))  # it waited for a server: disconnected
        assert state_of(c)["paused"] == "yes"
        assert "Connection refused" in _refused(g.dsn())
        assert "pooler is shutting down" in _refused(unix_dsn(g))
        assert busy.execute("SELECT 2").fetchone() == (2,)  # the transaction runs on
        with pytest.raises(psycopg.OperationalError, match="server shutting down"):
            idle.execute("SELECT 3")  # a new transaction would need a server
        assert g.proc.poll() is None
        busy.execute("COMMIT")  # the last server is released, closes: the gateway exits
        assert g.proc.wait(10) == 0
        assert "waiting for servers to finish their transactions" in g.log()
        assert "server connections dropped, exiting" in g.log()
    finally:
        for conn in (busy, idle, waiting, c):
            conn.close()


def test_shutdown_while_suspended_goes_down_at_once(cgw):
    """Every socket is paused under SUSPEND: a waiting shutdown could never finish, so it stops
    at once, as PgBouncer does."""
    with psycopg.connect(cgw.dsn(), autocommit=True) as a, console(cgw) as c:
        a.execute("SELECT 1")
        assert c.execute("SUSPEND").statusmessage == "SUSPEND"
        try:
            c.execute("SHUTDOWN WAIT_FOR_CLIENTS")
        except psycopg.OperationalError:
            pass  # the process may be gone before the answer
        assert cgw.proc.wait(10) == 0
    assert "suspend was in progress, going down immediately" in cgw.log()


def test_show_servers_lists_a_server_still_logging_in_as_new(pg, gw_factory):
    """An upstream that accepts the connection and never answers the startup packet: its
    server stays in login, as PgBouncer's new_server_list (SHOW SERVERS state "new")."""
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(mute.accept()[0]), daemon=True).start()
    g = gw_factory(settings={**ADMIN, "server_connect_timeout": "30"},
                   databases={"postgres": upstream_entry(pg),
                              "mute": f"host=127.0.0.1 port={mute.getsockname()[1]} dbname=x user=nobody"})
    try:
        with psycopg.connect(g.dsn(), autocommit=True) as a, console(g) as c:
            a.execute("BEGIN")
            a.execute("SELECT 1")
            t, box = _in_thread(lambda: psycopg.connect(g.dsn(dbname="mute")))
            rows = wait_for("the mute server in SHOW SERVERS",
                            lambda: [s for s in show(c, "SERVERS") if s["database"] == "mute"])
            assert [(s["state"], s["user"], s["remote_pid"], s["link"]) for s in rows] == [("new", "nobody", 0, "")]
            assert rows[0]["port"] == mute.getsockname()[1]
            assert pool_of(c, "mute")["sv_login"] == 1
            assert [s["state"] for s in show(c, "SERVERS") if s["database"] == "postgres"] == ["active"]
            a.execute("COMMIT")
            assert [s["state"] for s in show(c, "SERVERS") if s["database"] == "postgres"] == ["idle"]
            c.execute("KILL mute")  # the login gives up with the database
            t.join(10)
            assert "database removed" in str(box.get("error"))
            assert [s for s in show(c, "SERVERS") if s["database"] == "mute"] == []
    finally:
        for s in accepted:
            s.close()
        mute.close()


def test_server_states_are_pgbouncers_list_names():
    """SHOW SERVERS' state for each state a server connection can be in (PgBouncer 1.25's
    list names; the "used" and "being_canceled" moments are too short to catch end to end)."""
    from types import SimpleNamespace

    from pooler.gateway.server import S_ACTIVE, S_CONNECTING, S_IDLE, S_LOGIN, ServerConn

    def state(st, client=None, parked=False):
        return ServerConn.state_name(SimpleNamespace(state=st, client=client, parked=parked))
    assert state(S_CONNECTING) == state(S_LOGIN) == "new"
    assert state(S_IDLE) == "idle"
    assert state(S_ACTIVE, client=object()) == "active"
    assert state(S_ACTIVE) == "used"  # linked to nobody, not back in the pool (resetting)
    assert state(S_ACTIVE, parked=True) == "being_canceled"


def test_the_gateway_raises_its_file_descriptor_limit_for_max_client_conn(pg, gw_factory):
    """Started with a soft limit of 1,024 (a common default) and max_client_conn = 5000: the
    gateway raises its own soft limit (the hard one allows it) and logs the figures, as
    PgBouncer logs them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 6000:
        pytest.skip(f"hard file descriptor limit {hard} < 6000")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        g = gw_factory(settings={"max_client_conn": "5000"}, databases={"postgres": upstream_entry(pg)})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = open(f"/proc/{g.proc.pid}/limits").read()
    got = int(next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3])
    assert got >= 5000 + 5
    assert f"kernel file descriptor limit: {got} (hard: {hard}); max_client_conn: 5000" in g.log()

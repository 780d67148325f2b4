"""PgBouncer 1.25's per-pool and per-user settings through the gateway, with psycopg against the
real PostgreSQL: [users] pool_size and timeouts, per-database server_lifetime and
server_idle_timeout, reserve_pool_size/reserve_pool_timeout, server_check_query/delay,
server_round_robin, server_fast_close, max_db/user_client_connections, tcp_keepalive and friends,
so_reuseport."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import psycopg
import pytest

from pooler.config import Config
from pooler.gateway.netopts import tune_socket
from tests.conftest import login_roles, upstream_entry
from tests.gwproc import GatewayProc

ROLES = {"ps_a": "ps-a-pw", "ps_b": "ps-b-pw"}


@pytest.fixture(scope="module")
def roles(pg):
    return login_roles(pg, ROLES)


def per_user_gw(gw_factory, pg, settings=None, users=None, db_extra=""):
    """Database postgres with a pool per client user (passwords from the auth_file)."""
    s = {"default_pool_size": "3", "admin_users": "postgres"}
    s.update(settings or {})
    return gw_factory(settings=s, users=users or {}, auth_users=dict(ROLES),
                      databases={"postgres": f"host=127.0.0.1 port={pg.port} dbname=postgres{db_extra}"})


def error_of(conn) -> str | None:
    """The error a statement on ``conn`` gets now (None: it runs)."""
    try:
        conn.execute("SELECT 1")
    except psycopg.Error as e:
        return str(e)
    return None


def wait_until(cond, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def backends(pg, user) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' "
                       "AND backend_type = 'client backend'").strip())


def pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def console(gw):
    return psycopg.connect(gw.dsn(user="postgres", dbname="pgbouncer"), autocommit=True, prepare_threshold=None)


def show(gw, what) -> list[dict]:
    with console(gw) as c:
        cur = c.execute(f"SHOW {what}")
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


# --------------------------------------------------------------------------- [users]


def test_users_pool_size_caps_that_users_pool(gw_factory, pg, roles):
    gw = per_user_gw(gw_factory, pg, users={"ps_a": "pool_size=1"})
    a1 = psycopg.connect(gw.dsn(user="ps_a"))
    a1.execute("SELECT 1")  # a transaction holds ps_a's only server
    b = [psycopg.connect(gw.dsn(user="ps_b")) for _ in range(2)]
    for c in b:
        c.execute("SELECT 1")  # ps_b has the default pool size: both get a server
    assert backends(pg, "ps_b") == 2
    a2 = psycopg.connect(gw.dsn(user="ps_a"), autocommit=True)
    done = threading.Event()
    threading.Thread(target=lambda: (a2.execute("SELECT 1"), done.set()), daemon=True).start()
    wait_until(lambda: any(r["user"] == "ps_a" and r["cl_waiting"] == 1 for r in show(gw, "POOLS")), "ps_a waiting")
    assert backends(pg, "ps_a") == 1
    a1.commit()
    assert done.wait(10)
    assert backends(pg, "ps_a") == 1
    users = {r["name"]: r for r in show(gw, "USERS")}
    assert users["ps_a"]["pool_size"] == "1" and users["ps_b"]["pool_size"] == ""
    for c in (a1, a2, *b):
        c.close()


def test_users_transaction_timeout_and_client_limit(gw_factory, pg, roles):
    gw = per_user_gw(gw_factory, pg, users={"ps_a": "transaction_timeout=1 max_user_client_connections=1"})
    a = psycopg.connect(gw.dsn(user="ps_a"))
    with pytest.raises(psycopg.OperationalError, match=r"client connections exceeded \(max_user_client_connections\)"):
        psycopg.connect(gw.dsn(user="ps_a"))
    b = psycopg.connect(gw.dsn(user="ps_b"))  # no limit, no timeout for ps_b
    a.execute("SELECT 1")
    b.execute("SELECT 1")

    msg = wait_until(lambda: error_of(a), "ps_a's transaction to time out")
    assert "transaction_timeout" in msg
    assert b.execute("SELECT 2").fetchone() == (2,)  # ps_b's transaction is still open
    b.commit()
    b.close()


def test_max_db_client_connections_refuses_with_pgbouncers_text(gw_factory, pg, roles):
    gw = per_user_gw(gw_factory, pg, db_extra=" max_db_client_connections=2")
    c1 = psycopg.connect(gw.dsn(user="ps_a"))
    c2 = psycopg.connect(gw.dsn(user="ps_b"))
    with pytest.raises(psycopg.OperationalError, match=r"client connections exceeded \(max_db_client_connections\)"):
        psycopg.connect(gw.dsn(user="ps_a"))
    row = next(r for r in show(gw, "DATABASES") if r["name"] == "postgres")
    assert (row["max_client_connections"], row["current_client_connections"]) == (2, 2)
    c1.close()
    c2.close()


def test_a_burst_of_logins_cannot_get_past_max_db_client_connections(gw_factory, pg, roles):
    gw = per_user_gw(gw_factory, pg, db_extra=" max_db_client_connections=3")
    outcomes: list = []

    def login():
        try:
            outcomes.append(psycopg.connect(gw.dsn(user="ps_a")))
        except psycopg.OperationalError as e:
            outcomes.append(str(e))

    # all at once, on a fresh pool: each login then waits for the first server's parameters
    # after its limit check, the moment a count of finished logins would let them all in
    threads = [threading.Thread(target=login) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    conns = [o for o in outcomes if isinstance(o, psycopg.Connection)]
    refused = [o for o in outcomes if isinstance(o, str)]
    assert len(conns) == 3 and len(refused) == 9, refused
    assert all("client connections exceeded (max_db_client_connections)" in r for r in refused)
    conns.pop().close()  # a client that leaves frees its place
    with psycopg.connect(gw.dsn(user="ps_b")) as late:
        assert late.execute("SELECT 1").fetchone() == (1,)
    for c in conns:
        c.close()


# --------------------------------------------------------------------------- per-database timeouts


def test_per_database_server_lifetime_zero_uses_a_server_once(gw_factory, pg):
    gw = gw_factory(databases={"once": upstream_entry(pg) + " server_lifetime=0", "kept": upstream_entry(pg)},
                    settings={"admin_users": "postgres"})
    with psycopg.connect(gw.dsn(dbname="once"), autocommit=True) as c:
        pids = {pid(c) for _ in range(3)}
    assert len(pids) == 3  # transaction pooling: every transaction on a new server
    with psycopg.connect(gw.dsn(dbname="kept"), autocommit=True) as c:
        pids = {pid(c) for _ in range(3)}
    assert len(pids) == 1
    rows = {r["name"]: r for r in show(gw, "DATABASES")}
    assert rows["once"]["server_lifetime"] == 0 and rows["kept"]["server_lifetime"] == 3600


def test_fast_logins_over_the_unix_socket_are_not_lost(gw_factory, pg):
    # over a Unix socket with trust, PostgreSQL's whole login reply can arrive before the task
    # that opened the connection awaits it: a login that finished that early was waited for
    # until server_connect_timeout (one in a few dozen)
    gw = gw_factory(databases={"once": f"host={pg.socket_dir} port={pg.port} dbname=postgres "
                                       f"user={pg.superuser} server_lifetime=0"},
                    settings={"server_connect_timeout": "5"})
    with psycopg.connect(gw.dsn(dbname="once"), autocommit=True) as c:
        pids = {pid(c) for _ in range(150)}
    assert len(pids) == 150  # each transaction logged in a new server, none timed out


def test_per_database_server_idle_timeout_closes_idle_servers(gw_factory, pg, roles):
    gw = per_user_gw(gw_factory, pg, db_extra=" server_idle_timeout=1")
    with psycopg.connect(gw.dsn(user="ps_a"), autocommit=True) as c:
        c.execute("SELECT 1")
        assert backends(pg, "ps_a") == 1
        wait_until(lambda: backends(pg, "ps_a") == 0, "the idle server to close")
        assert c.execute("SELECT 3").fetchone() == (3,)  # a new one serves the client


# --------------------------------------------------------------------------- reserve pool, checks, order


def test_reserve_pool_serves_a_client_that_waited_reserve_pool_timeout(gw_factory, pg, roles):
    gw = per_user_gw(gw_factory, pg, settings={"default_pool_size": "1", "reserve_pool_size": "1",
                                               "reserve_pool_timeout": "1"})
    holder = psycopg.connect(gw.dsn(user="ps_a"))
    holder.execute("SELECT 1")  # holds the pool's only regular server
    waiter = psycopg.connect(gw.dsn(user="ps_a"), autocommit=True)
    t0 = time.monotonic()
    assert waiter.execute("SELECT 4").fetchone() == (4,)  # served by the reserve while holder holds on
    assert time.monotonic() - t0 >= 0.9
    assert backends(pg, "ps_a") == 2
    assert "taking connection from reserve_pool" in gw.log()
    holder.close()
    waiter.close()


def test_server_check_query_runs_before_an_idle_server_is_handed_out(gw_factory, pg, roles):
    pg.execute("DROP SEQUENCE IF EXISTS check_runs")
    pg.execute("CREATE SEQUENCE check_runs")
    pg.execute("GRANT USAGE ON SEQUENCE check_runs TO ps_a")
    runs = lambda: int(pg.psql("SELECT last_value - 1 + (CASE WHEN is_called THEN 1 ELSE 0 END) FROM check_runs").strip())  # noqa: E731
    check = "SELECT nextval('public.check_runs')"
    for delay, expected in (("30", 0), ("0", 3)):
        gw = per_user_gw(gw_factory, pg, settings={"server_check_delay": delay, "server_check_query": check,
                                                   "default_pool_size": "1"})
        before = runs()
        with psycopg.connect(gw.dsn(user="ps_a"), autocommit=True) as c:
            pids = {pid(c) for _ in range(3)}
        assert runs() - before == expected  # server_check_delay = 0: checked at every hand-out
        assert len(pids) == 1  # a check that passes keeps the server
        gw.stop()


def test_a_failing_server_check_replaces_the_server(gw_factory, pg, roles):
    gw = per_user_gw(gw_factory, pg, settings={"server_check_delay": "0", "server_check_query": "SELECT 1/0",
                                               "default_pool_size": "1"})
    with psycopg.connect(gw.dsn(user="ps_a"), autocommit=True) as c:
        pids = [pid(c) for _ in range(3)]
    assert len(set(pids)) == 3  # each check failed: its server closed, a new one served the query


def test_server_round_robin_spreads_transactions_over_idle_servers(gw_factory, pg, roles):
    results = {}
    for rr in ("0", "1"):
        gw = per_user_gw(gw_factory, pg, settings={"server_round_robin": rr, "min_pool_size": "2",
                                                   "default_pool_size": "2"}, db_extra=" user=ps_a")
        with psycopg.connect(gw.dsn(user="ps_a"), autocommit=True) as c:
            c.execute("SELECT 1")
            wait_until(lambda: backends(pg, "ps_a") == 2, "min_pool_size servers")
            results[rr] = [pid(c) for _ in range(4)]
        gw.stop()
        wait_until(lambda: backends(pg, "ps_a") == 0, "the gateway's servers to go")
    assert len(set(results["0"])) == 1  # LIFO: the warmest server every time
    assert len(set(results["1"])) == 2 and results["1"][0] != results["1"][1]


def test_server_fast_close_ends_an_idle_session_mode_client_after_reconnect(gw_factory, pg, roles):
    for fast in ("1", "0"):
        gw = per_user_gw(gw_factory, pg, settings={"pool_mode": "session", "server_fast_close": fast})
        c = psycopg.connect(gw.dsn(user="ps_a"), autocommit=True)
        c.execute("SELECT 1")
        with console(gw) as adm:
            adm.execute("RECONNECT postgres")
        if fast == "1":
            assert "server_fast_close" in wait_until(lambda: error_of(c), "the fast close")
        else:
            assert c.execute("SELECT 5").fetchone() == (5,)  # the session keeps its server
        c.close()
        gw.stop()


def test_server_fast_close_ends_a_session_whose_database_a_reload_changed(gw_factory, pg, roles):
    gw = per_user_gw(gw_factory, pg, settings={"pool_mode": "session", "server_fast_close": "1"})
    c = psycopg.connect(gw.dsn(user="ps_a"), autocommit=True)
    c.execute("SELECT 1")
    gw.databases["postgres"] = f"host={pg.socket_dir} port={pg.port} dbname=postgres"  # the same cluster, another way
    gw.write_ini()
    with console(gw) as adm:
        adm.execute("RELOAD")
    assert "server_fast_close" in wait_until(lambda: error_of(c), "the fast close")
    with psycopg.connect(gw.dsn(user="ps_a"), autocommit=True) as again:  # a new session: the new pool
        assert again.execute("SELECT 2").fetchone() == (2,)
    c.close()


# --------------------------------------------------------------------------- sockets


def test_tune_socket_sets_keepalive_and_user_timeout_on_a_real_socket():
    cfg = Config(path=None, tcp_keepidle=7, tcp_keepintvl=3, tcp_keepcnt=4, tcp_user_timeout=5000)
    with socket.socket() as s:
        tune_socket(s, cfg)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 5000
    with socket.socket() as s:
        tune_socket(s, Config(path=None, tcp_keepalive=False))
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_keepalive_timers_run_on_client_and_server_sockets(gw_factory, pg):
    gw = gw_factory(settings={"tcp_keepidle": "7"}, databases={"postgres": upstream_entry(pg)})

    def keepalive_everywhere():
        out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{gw.port} or dport = :{pg.port} )"],
                             capture_output=True, text=True, timeout=10).stdout
        lines = [ln.split() for ln in out.splitlines()]
        gw_side = [ln for ln in lines if ln[2].endswith(f":{gw.port}")]
        to_pg = [ln for ln in lines if ln[3].endswith(f":{pg.port}") and not ln[2].endswith(f":{gw.port}")]
        # (a timer shows only while no retransmission timer runs: wait for the quiet state)
        return gw_side and to_pg and all("timer:(keepalive" in " ".join(ln) for ln in gw_side + to_pg)

    with psycopg.connect(gw.dsn(), autocommit=True) as c:
        c.execute("SELECT 1")
        wait_until(keepalive_everywhere, "keepalive timers on the gateway's client and server sockets")


def test_so_reuseport_lets_two_gateways_share_a_port(gw_factory, pg, tmp_path):
    first = gw_factory(settings={"so_reuseport": "1"}, databases={"postgres": upstream_entry(pg)})
    (tmp_path / "second").mkdir()
    second = GatewayProc({"postgres": upstream_entry(pg)}, workdir=str(tmp_path / "second"),
                         settings={"so_reuseport": "1", "listen_port": str(first.port)})
    second.port = first.port
    second.start()  # without so_reuseport: "address already in use"
    try:
        for _ in range(4):
            with psycopg.connect(first.dsn(), autocommit=True) as c:
                assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        second.stop()

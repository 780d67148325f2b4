"""End-to-end pooling behaviour through the gateway with real clients and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest

from pooler.protocol import messages as m


def psql(gw, sql, user="postgres", dbname="postgres", password=None, check=True, extra_env=None):
    env = dict(os.environ)
    env.pop("PGPASSWORD", None)
    if password is not None:
        env["PGPASSWORD"] = password
    env.update(extra_env or {})
    r = subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", gw.dsn(user=user, dbname=dbname), "-c", sql],
                       capture_output=True, text=True, env=env, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"psql failed ({r.returncode}): {r.stderr}\n--- gateway log:\n{gw.log()[-3000:]}")
    return r


def connect_error(gw, user="postgres", dbname="postgres", password=None) -> str:
    """SQLSTATE of a refused login (asyncpg keeps it; libpq does not at connect time)."""
    async def attempt():
        try:
            c = await asyncpg.connect(host=gw.host, port=gw.port, user=user, database=dbname,
                                      password=password, ssl=False)
        except asyncpg.PostgresError as e:
            return e.sqlstate
        await c.close()
        return "00000"
    return asyncio.run(attempt())


# --------------------------------------------------------------------------- basics


def test_psql_through_gateway(gw):
    r = psql(gw, "select 40 + 2, current_setting('application_name')")
    assert r.stdout.strip() == "42|psql"


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_all_protocols(gw, pgbench_db, mode):
    # -j equals -c: pgbench prepares statements synchronously per thread, which with more
    # clients than servers can wait forever on any transaction pooler (PgBouncer included).
    r = subprocess.run(["pgbench", "-n", "-M", mode, "-c", "8", "-j", "8", "-t", "40", gw.dsn(dbname=pgbench_db)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + gw.log()[-2000:]
    assert "number of transactions actually processed: 320/320" in r.stdout
    assert "number of failed transactions: 0" in r.stdout


def test_pgbench_select_only_many_clients_few_servers(gw, pgbench_db):
    r = subprocess.run(["pgbench", "-n", "-S", "-M", "prepared", "-c", "40", "-j", "2", "-t", "50", gw.dsn(dbname=pgbench_db)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "actually processed: 2000/2000" in r.stdout


def test_fifty_clients_five_servers_each_reads_only_its_own_writes(pg, gw_factory):
    gw = gw_factory(settings={"default_pool_size": 5, "pool_mode": "transaction"})
    pg.execute("DROP TABLE IF EXISTS own; CREATE TABLE own (client int, n int, txt text)")

    async def client(i: int) -> None:
        conn = await psycopg.AsyncConnection.connect(gw.dsn())
        try:
            for n in range(10):
                async with conn.transaction():
                    await conn.execute("INSERT INTO own VALUES (%s, %s, %s)", (i, n, f"c{i}-{n}"))
                    # a session-level setting inside the transaction stays invisible to others
                    await conn.execute("SELECT set_config('pooler.me', %s, true)", (str(i),))
                    cur = await conn.execute("SELECT current_setting('pooler.me'), count(*) FROM own WHERE client = %s", (i,))
                    me, cnt = await cur.fetchone()
                    assert me == str(i) and cnt == n + 1
            cur = await conn.execute("SELECT array_agg(txt ORDER BY n) FROM own WHERE client = %s", (i,))
            (txts,) = await cur.fetchone()
            assert txts == [f"c{i}-{n}" for n in range(10)]
        finally:
            await conn.close()

    async def main():
        await asyncio.gather(*(client(i) for i in range(50)))

    asyncio.run(main())
    assert pg.psql("SELECT count(*), count(DISTINCT client) FROM own").strip() == "500|50"
    # never more server connections than the pool allows
    n = int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = 'postgres' AND application_name <> 'psql'").strip())
    assert n <= 5 + 1


# --------------------------------------------------------------------------- prepared statements


def test_psycopg_prepares_after_five_executions_in_transaction_mode(gw):
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        for i in range(20):  # psycopg prepares server-side after prepare_threshold (5)
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
        # explicit prepare=True, and many statements so the cache churns
        for i in range(30):
            assert conn.execute(f"SELECT {i} + %s::int", (1,), prepare=True).fetchone() == (i + 1,)


def test_many_psycopg_connections_share_prepared_statements(gw):
    conns = [psycopg.connect(gw.dsn(), autocommit=True) for _ in range(12)]
    try:
        for round_ in range(3):
            for i, c in enumerate(conns):
                row = c.execute("SELECT %s::int * 2, %s::text", (i, f"r{round_}"), prepare=True).fetchone()
                assert row == (i * 2, f"r{round_}")
    finally:
        for c in conns:
            c.close()


def test_asyncpg_default_settings_in_transaction_mode(gw):
    async def main():
        conns = [await asyncpg.connect(gw.url()) for _ in range(10)]
        try:
            async def work(c, i):
                for n in range(15):
                    assert await c.fetchval("SELECT $1::int + $2::int", i, n) == i + n
                    async with c.transaction():
                        assert await c.fetchval("SELECT $1::text || 'x'", str(n)) == f"{n}x"
                stmt = await c.prepare("SELECT generate_series(1, $1::int)")
                assert len(await stmt.fetch(5)) == 5
            await asyncio.gather(*(work(c, i) for i, c in enumerate(conns)))
        finally:
            for c in conns:
                await c.close()

    asyncio.run(main())


def test_prepared_statement_errors_match_postgresql(gw):
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        pgc = conn.pgconn
        # Parse of a name that exists -> 42P05, the session keeps working
        res = pgc.prepare(b"s1", b"SELECT 1")
        assert res.status == psycopg.pq.ExecStatus.COMMAND_OK
        res = pgc.prepare(b"s1", b"SELECT 2")
        assert res.status == psycopg.pq.ExecStatus.FATAL_ERROR
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42P05"
        # unknown name -> 26000
        res = pgc.exec_prepared(b"nope", [])
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        res = pgc.describe_prepared(b"nope")
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        # SQL-level DEALLOCATE of a protocol-level statement, then it is gone
        conn.execute("DEALLOCATE s1")
        res = pgc.exec_prepared(b"s1", [])
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        # DEALLOCATE ALL and DISCARD ALL forget every statement, as PostgreSQL does
        pgc.prepare(b"a", b"SELECT 'a'")
        pgc.prepare(b"b", b"SELECT 'b'")
        assert pgc.exec_prepared(b"a", []).get_value(0, 0) == b"a"
        conn.execute("DEALLOCATE ALL")
        assert pgc.exec_prepared(b"a", []).error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        pgc.prepare(b"a", b"SELECT 'again'")
        conn.execute("DISCARD ALL")
        assert pgc.exec_prepared(b"a", []).error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        # and the names can be reused afterwards
        assert pgc.prepare(b"a", b"SELECT 'new'").status == psycopg.pq.ExecStatus.COMMAND_OK
        assert pgc.exec_prepared(b"a", []).get_value(0, 0) == b"new"
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_prepared_statement_error_inside_transaction_fails_the_transaction(gw):
    with psycopg.connect(gw.dsn()) as conn:
        pgc = conn.pgconn
        conn.execute("SELECT 1")  # BEGIN is sent implicitly
        res = pgc.exec_prepared(b"missing", [])
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        assert pgc.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_max_prepared_statements_evicts_lru(gw_factory):
    gw = gw_factory(settings={"max_prepared_statements": 3, "default_pool_size": 1})
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        for rnd in range(3):
            for i in range(8):
                assert conn.execute(f"SELECT {i} AS v, %s::int", (rnd,), prepare=True).fetchone() == (i, rnd)
        n = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
        assert n <= 3


def test_pipeline_with_several_syncs(gw):
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with conn.pipeline() as p:
            curs = [conn.execute("SELECT %s::int", (i,)) for i in range(20)]
            p.sync()
            more = [conn.execute("SELECT %s::text", (f"x{i}",), prepare=True) for i in range(10)]
        assert [c.fetchone()[0] for c in curs] == list(range(20))
        assert [c.fetchone()[0] for c in more] == [f"x{i}" for i in range(10)]


# --------------------------------------------------------------------------- isolation


def test_client_killed_mid_transaction_releases_its_locks(pg, gw_factory):
    gw = gw_factory(settings={"default_pool_size": 2})
    pg.execute("DROP TABLE IF EXISTS lk; CREATE TABLE lk (id int primary key, v int); INSERT INTO lk VALUES (1, 0)")
    victim = subprocess.Popen(["psql", "-X", "-d", gw.dsn()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    victim.stdin.write("BEGIN;\nUPDATE lk SET v = 1 WHERE id = 1;\nSELECT 'locked';\n")
    victim.stdin.flush()
    assert victim.stdout.readline().strip() in ("BEGIN",)
    # wait for the lock to be really held (observe, do not sleep)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pg.psql("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'lk' AND l.mode = 'RowExclusiveLock'").strip() != "0":
            break
    victim.kill()
    victim.wait()
    # another client can take the row lock at once (lock_timeout makes a leak fail fast)
    r = psql(gw, "SET lock_timeout = '5s'; UPDATE lk SET v = 2 WHERE id = 1 RETURNING v")
    assert "2" in r.stdout.strip().splitlines()
    assert pg.psql("SELECT v FROM lk").strip() == "2"


def test_transaction_state_never_leaks_to_next_client(gw_factory):
    gw = gw_factory(settings={"default_pool_size": 1})
    c1 = psycopg.connect(gw.dsn())
    c1.execute("CREATE TEMP TABLE IF NOT EXISTS leak_probe (x int)")
    c1.execute("INSERT INTO leak_probe VALUES (1)")
    # c1 holds the only server in its open transaction; closing it abruptly must roll back
    c1.pgconn.finish()
    with psycopg.connect(gw.dsn(), autocommit=True) as c2:
        assert c2.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND datname = current_database()").fetchone()[0] == 0
        assert c2.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_client_parameters_follow_the_client(gw_factory):
    gw = gw_factory(settings={"default_pool_size": 1})
    a = psycopg.connect(gw.dsn(), autocommit=True)
    b = psycopg.connect(gw.dsn(application_name="bee"), autocommit=True)
    try:
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        a.execute("SET DateStyle = 'German'")
        b.execute("SET TimeZone = 'America/New_York'")
        for _ in range(3):
            assert a.execute("SHOW TimeZone").fetchone()[0] == "Asia/Tokyo"
            assert b.execute("SHOW TimeZone").fetchone()[0] == "America/New_York"
            assert a.execute("SHOW DateStyle").fetchone()[0].startswith("German")
            assert b.execute("SHOW DateStyle").fetchone()[0].startswith("ISO")
            assert b.execute("SHOW application_name").fetchone()[0] == "bee"
            assert a.execute("SHOW application_name").fetchone()[0] != "bee"
        assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
    finally:
        a.close()
        b.close()


def test_session_mode_resets_server_between_clients(gw_factory):
    gw = gw_factory(settings={"pool_mode": "session", "default_pool_size": 1})
    with psycopg.connect(gw.dsn(), autocommit=True) as a:
        a.execute("SET search_path = pg_catalog")
        a.execute("PREPARE p AS SELECT 1")
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    with psycopg.connect(gw.dsn(), autocommit=True) as b:
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid  # same server, reused
        assert b.execute("SHOW search_path").fetchone()[0] == '"$user", public'
        assert b.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] == 0


def test_statement_mode_refuses_transaction_blocks(gw_factory):
    gw = gw_factory(settings={"pool_mode": "statement"})
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    r = subprocess.run(["psql", "-X", "-d", gw.dsn(), "-v", "ON_ERROR_STOP=1"], input="BEGIN;\nSELECT 1;\nCOMMIT;\n",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "transaction blocks not allowed in statement pooling mode" in r.stderr
    # a transaction inside one Query message is one statement for the pool: allowed
    assert psql(gw, "BEGIN; SELECT 1; COMMIT;").returncode == 0


def test_copy_in_and_out(pg, gw):
    pg.execute("DROP TABLE IF EXISTS cp; CREATE TABLE cp (id int, t text)")
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY cp FROM STDIN") as cp:
                for i in range(20000):
                    cp.write_row((i, "x" * 50))
            out = bytearray()
            with cur.copy("COPY cp TO STDOUT") as cp:
                for chunk in cp:
                    out += chunk
        assert out.count(b"\n") == 20000
        assert conn.execute("SELECT count(*) FROM cp").fetchone() == (20000,)


def test_large_result_streams(gw):
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        cur = conn.execute("SELECT i, repeat('y', 1000) FROM generate_series(1, 20000) i")
        n = sum(1 for _ in cur)
        assert n == 20000
        # a single huge value split over many TCP reads
        v = conn.execute("SELECT repeat('z', 5000000)").fetchone()[0]
        assert len(v) == 5000000


# --------------------------------------------------------------------------- cancel


def test_cancel_reaches_only_its_own_query(gw_factory):
    gw = gw_factory(settings={"default_pool_size": 3})
    victim = psycopg.connect(gw.dsn(), autocommit=True)
    other = psycopg.connect(gw.dsn(), autocommit=True)
    errors = {}

    def run(conn, name, sql):
        try:
            conn.execute(sql)
            errors[name] = None
        except psycopg.Error as e:
            errors[name] = e.sqlstate

    tv = threading.Thread(target=run, args=(victim, "victim", "SELECT pg_sleep(30)"))
    to = threading.Thread(target=run, args=(other, "other", "SELECT pg_sleep(1.5)"))
    tv.start()
    to.start()
    # wait until both queries run on the server
    with psycopg.connect(gw.dsn(), autocommit=True) as mon:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            n = mon.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(%' AND state = 'active'").fetchone()[0]
            if n == 2:
                break
    t0 = time.monotonic()
    victim.cancel()
    tv.join(10)
    assert errors["victim"] == "57014"
    assert time.monotonic() - t0 < 5
    to.join(10)
    assert errors["other"] is None  # the other client's query was not touched
    assert victim.execute("SELECT 1").fetchone() == (1,)
    victim.close()
    other.close()


def test_cancel_of_a_statement_waiting_for_a_server_fails_it_unrun(pg, gw_factory):
    """A client waiting for a server (the pool is busy) sends a cancel: its statement never
    reaches PostgreSQL, it fails with 57014 at once, and the session goes on (simple and
    extended protocol)."""
    gw = gw_factory(settings={"default_pool_size": 1, "admin_users": "admin"},
                    databases={"postgres": f"host=127.0.0.1 port={pg.port} dbname=postgres user={pg.superuser} "
                                           f"password={pg.password}"})
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        direct.execute("DROP SEQUENCE IF EXISTS cancel_waiting; CREATE SEQUENCE cancel_waiting")
    holder = psycopg.connect(gw.dsn(), autocommit=True)
    waiter = psycopg.connect(gw.dsn(), autocommit=True)
    console = psycopg.connect(gw.dsn(user="admin", dbname="pgbouncer"), autocommit=True, prepare_threshold=None)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        for sql, params in (("SELECT nextval('cancel_waiting')", None), ("SELECT nextval(%s)", ("cancel_waiting",))):
            box = {}

            def run():
                try:
                    box["result"] = waiter.execute(sql, params).fetchone()
                except psycopg.Error as e:
                    box["error"] = e
            t = threading.Thread(target=run, daemon=True)
            t.start()
            deadline = time.monotonic() + 10
            while console.execute("SHOW POOLS").fetchall()[0][3] != 1:  # cl_waiting: it waits for the server
                assert time.monotonic() < deadline, "the statement never waited"
                time.sleep(0.02)
            waiter.cancel()
            t.join(10)
            assert isinstance(box.get("error"), psycopg.errors.QueryCanceled), box
        holder.execute("COMMIT")
        assert waiter.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(pg.dsn(), autocommit=True) as direct:
            assert direct.execute("SELECT last_value, is_called FROM cancel_waiting").fetchone() == (1, False)
    finally:
        for conn in (holder, waiter, console):
            conn.close()


def test_cancel_with_unknown_key_is_harmless(gw):
    with socket.create_connection((gw.host, gw.port)) as s:
        s.sendall(m.cancel_request(12345, 67890))
        assert s.recv(100) == b""  # closed without answer, as PostgreSQL does
    assert psql(gw, "SELECT 1").stdout.strip() == "1"


# --------------------------------------------------------------------------- failures


def test_wrong_password_gets_28P01(pg, gw_factory):
    gw = gw_factory(settings={"auth_type": "scram-sha-256"}, auth_users={"alice": "right-password"})
    r = psql(gw, "SELECT 1", user="alice", password="wrong", check=False)
    assert r.returncode != 0 and 'password authentication failed for user "alice"' in r.stderr
    assert connect_error(gw, user="alice", password="wrong") == "28P01"
    assert connect_error(gw, user="mallory", password="x") == "28P01"
    assert psql(gw, "SELECT current_user", user="alice", password="right-password").stdout.strip() == pg.superuser
    assert "right-password" not in gw.log()


@pytest.mark.parametrize("method", ["md5", "scram-sha-256", "plain"])
def test_client_auth_methods(pg, gw_factory, method):
    from pooler.auth.passwords import ScramSecret, md5_secret

    users = {"plainpw": "pw1", "md5pw": md5_secret("md5pw", "pw2"), "scrampw": ScramSecret.from_password("pw3").to_string()}
    gw = gw_factory(settings={"auth_type": method}, auth_users=users)
    ok = {"plainpw": "pw1", "md5pw": "pw2", "scrampw": "pw3"}
    for user, pw in ok.items():
        if method == "scram-sha-256" and user == "md5pw":
            continue  # an md5 secret cannot serve SCRAM, as in PostgreSQL
        with psycopg.connect(gw.dsn(user=user, password=pw)) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(gw.dsn(user=user, password=pw + "x"))


def test_random_bytes_oversize_and_truncated_startup_close_only_their_session(gw):
    with psycopg.connect(gw.dsn(), autocommit=True) as bystander:
        bystander.execute("SELECT 1")
        # random bytes
        with socket.create_connection((gw.host, gw.port)) as s:
            s.sendall(os.urandom(64))
            s.settimeout(5)
            data = s.recv(1000)
            assert data == b"" or data[:1] == b"E"
        # an oversize length in the startup packet
        with socket.create_connection((gw.host, gw.port)) as s:
            s.sendall(struct.pack("!i", 100_000_000) + b"\x00\x03\x00\x00")
            s.settimeout(5)
            data = s.recv(1000)
            assert data[:1] == b"E" and b"08P01" in data
        # a truncated startup packet, then the client goes away
        with socket.create_connection((gw.host, gw.port)) as s:
            s.sendall(struct.pack("!i", 40) + b"\x00\x03\x00\x00user\x00")
        # an oversize message after login
        with socket.create_connection((gw.host, gw.port)) as s:
            s.sendall(m.startup_message({"user": "postgres", "database": "postgres"}))
            s.settimeout(5)
            buf = b""
            while not buf.endswith(m.ready_for_query()):
                chunk = s.recv(4096)
                assert chunk
                buf += chunk
            s.sendall(b"Q" + struct.pack("!i", 2_000_000_000))
            data = s.recv(1000)
            assert data[:1] == b"E" and b"max_packet_size" in data
        # an unknown message type after login
        with socket.create_connection((gw.host, gw.port)) as s:
            s.sendall(m.startup_message({"user": "postgres", "database": "postgres"}))
            s.settimeout(5)
            buf = b""
            while not buf.endswith(m.ready_for_query()):
                buf += s.recv(4096)
            s.sendall(b"?\x00\x00\x00\x04")
            assert s.recv(1000)[:1] == b"E"
        # the bystander never noticed
        assert bystander.execute("SELECT 2").fetchone() == (2,)
    assert psql(gw, "SELECT 3").stdout.strip() == "3"


def test_ssl_request_answered_no_and_protocol_negotiation(gw):
    with socket.create_connection((gw.host, gw.port)) as s:
        s.sendall(struct.pack("!ii", 8, m.SSL_REQUEST_CODE))
        assert s.recv(1) == b"N"
        s.sendall(struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE))
        assert s.recv(1) == b"N"
        body = struct.pack("!i", (3 << 16) | 1) + b"user\x00postgres\x00database\x00postgres\x00_pq_.x\x001\x00\x00"
        s.sendall(struct.pack("!i", len(body) + 4) + body)
        s.settimeout(5)
        buf = b""
        while not buf.endswith(m.ready_for_query()):
            chunk = s.recv(4096)
            assert chunk
            buf += chunk
        assert buf[:1] == b"v"
        minor, count = struct.unpack_from("!ii", buf, 5)
        assert (minor, count) == (0, 1) and b"_pq_.x" in buf


def test_protocol_2_startup_is_refused(gw):
    with socket.create_connection((gw.host, gw.port)) as s:
        body = struct.pack("!i", 2 << 16) + b"user\x00postgres\x00\x00"
        s.sendall(struct.pack("!i", len(body) + 4) + body)
        s.settimeout(5)
        data = s.recv(1000)
        assert data[:1] == b"E" and b"0A000" in data


def test_unknown_database_is_3D000(pg, gw_factory):
    gw = gw_factory(databases={"postgres": f"host=127.0.0.1 port={pg.port} user=postgres password={pg.password}"})
    assert connect_error(gw, dbname="no_such_db") == "3D000"
    # with a "*" fallback the server's own answer comes through
    gw2 = gw_factory()
    assert connect_error(gw2, dbname="no_such_db") == "3D000"


def test_query_wait_timeout(gw_factory):
    gw = gw_factory(settings={"default_pool_size": 1, "query_wait_timeout": 1})
    holder = psycopg.connect(gw.dsn())
    holder.execute("SELECT 1")  # holds the only server in a transaction
    try:
        with psycopg.connect(gw.dsn(), autocommit=True) as waiter:
            with pytest.raises(psycopg.OperationalError) as e:
                waiter.execute("SELECT 1")
            assert "query_wait_timeout" in str(e.value)
    finally:
        holder.close()


def test_max_client_conn(gw_factory):
    gw = gw_factory(settings={"max_client_conn": 2})
    a = psycopg.connect(gw.dsn())
    b = psycopg.connect(gw.dsn())
    try:
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(gw.dsn())
        assert "max_client_conn" in str(e.value)
    finally:
        a.close()
        b.close()
    with psycopg.connect(gw.dsn()) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_postgres_restart_under_the_gateway(pg, gw_factory):
    gw = gw_factory(settings={"default_pool_size": 2})
    conn = psycopg.connect(gw.dsn(), autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    pg.stop_server(mode="fast")
    try:
        with pytest.raises(psycopg.OperationalError) as e:
            conn.execute("SELECT 1")
        assert e.value.sqlstate in ("08006", "08001", "57P01")
    finally:
        pg.start_server()
    # the same session (transaction mode) works again, and new sessions too
    deadline = time.monotonic() + 15
    while True:
        try:
            if conn.closed:
                conn = psycopg.connect(gw.dsn(), autocommit=True)
            assert conn.execute("SELECT 2").fetchone() == (2,)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
    with psycopg.connect(gw.dsn()) as c2:
        assert c2.execute("SELECT 3").fetchone() == (3,)
    conn.close()


# --------------------------------------------------------------------------- signals


def test_sighup_reload_keeps_sessions_and_applies_changes(gw_factory):
    gw = gw_factory(settings={"default_pool_size": 2})
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        gw.settings["default_pool_size"] = "4"
        gw.settings["server_idle_timeout"] = "300"
        gw.write_ini()
        gw.signal(signal.SIGHUP)
        gw.wait_log("configuration reloaded")
        assert conn.execute("SELECT 2").fetchone() == (2,)
        # a broken file is refused and the old config keeps serving
        good = gw.ini.read_text()
        gw.ini.write_text(good + "\n[gateway]\nlisten_port = notaport\n")
        gw.signal(signal.SIGHUP)
        gw.wait_log("reload failed")
        assert conn.execute("SELECT 3").fetchone() == (3,)
        gw.ini.write_text(good)


def test_sigint_waits_for_running_transaction(gw_factory):
    gw = gw_factory()
    conn = psycopg.connect(gw.dsn())
    conn.execute("SELECT 1")  # inside a transaction
    gw.signal(signal.SIGINT)
    gw.wait_log("SIGINT received")
    # the transaction may finish
    conn.execute("SELECT 2")
    conn.commit()
    assert gw.proc.wait(15) == 0
    conn.close()


def test_sigterm_waits_for_clients_second_signal_is_immediate(gw_factory):
    gw = gw_factory()
    conn = psycopg.connect(gw.dsn(), autocommit=True)
    gw.signal(signal.SIGTERM)
    gw.wait_log("SIGTERM received")
    assert conn.execute("SELECT 1").fetchone() == (1,)  # still served
    with pytest.raises(subprocess.TimeoutExpired):
        gw.proc.wait(0.5)
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(15) == 0
    conn.close()


def test_server_passing_to_another_identity_is_reset_but_keeps_each_clients_parameters(gw_factory):
    """Transaction pooling, one server, two identities: what one leaves in the server session
    (a custom setting, a temp table) never reaches the other, and each keeps its own TimeZone
    and DateStyle across the resets."""
    gw = gw_factory(settings={"default_pool_size": "1"}, users={"u1": "groups=g1", "u2": "groups=g2"})
    with psycopg.connect(gw.dsn(user="u1"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2"), autocommit=True) as b:
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        b.execute("SET DateStyle = 'SQL, DMY'")
        for i in range(3):
            a.execute("SELECT set_config('x.y', %s, false)", (f"from-u1-{i}",))
            a.execute("CREATE TEMP TABLE IF NOT EXISTS left_behind (v int)")
            assert b.execute("SELECT current_setting('x.y', true)").fetchone()[0] in (None, "")
            assert b.execute("SELECT count(*) FROM pg_class WHERE relname = 'left_behind'").fetchone()[0] == 0
            assert b.execute("SHOW DateStyle").fetchone()[0] == "SQL, DMY"
            assert b.execute("SHOW TimeZone").fetchone()[0] != "Asia/Tokyo"
            assert a.execute("SHOW TimeZone").fetchone()[0] == "Asia/Tokyo"
            assert a.execute("SHOW DateStyle").fetchone()[0] != "SQL, DMY"
            pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid_a  # one server

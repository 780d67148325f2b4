"""``stmt.read_only`` means what PostgreSQL means: a statement is read-only exactly when a
transaction with ``transaction_read_only = on`` may run it (docs/rules.md, "What read_only
means").

Every row of the table runs on the real test cluster inside ``BEGIN READ ONLY`` (then ROLLBACK),
or, for the few statements that cannot run in a transaction block, alone in a session with
``default_transaction_read_only = on``. PostgreSQL's verdict (refused with 25006
read_only_sql_transaction, or not) must be what the row says, and the analyzer's fact must
agree with it, except where the row names why the fact is deliberately stricter (false although
PostgreSQL runs it). A write judged read-only fails this test.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pytest

from pooler.sql.analyzer import analyze

REFUSED = "25006"  # read_only_sql_transaction
OK = "ok"

CODE = "runs code the gateway cannot see"
OTHERS = "acts on other sessions"
WRITES = "writes although PostgreSQL lets it run"


@dataclass(frozen=True)
class Row:
    sql: str
    pg: str | tuple = OK  # what PostgreSQL answers: OK, REFUSED, or another SQLSTATE past the read-only check
    stricter: str = ""  # why read_only is false although PostgreSQL runs it
    setup: tuple = ()  # run first inside the read-only transaction
    before: tuple = ()  # run first outside it (in the same session)
    alone: bool = False  # cannot run in a transaction block
    executes: str = ""  # EXECUTE: the prepared statement the gateway judges it as

    def __str__(self) -> str:
        return self.sql


TABLE = [
    # transaction control
    Row("BEGIN"),
    Row("START TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
    Row("COMMIT"),
    Row("ROLLBACK"),
    Row("SAVEPOINT a"),
    Row("RELEASE SAVEPOINT a", setup=("SAVEPOINT a",)),
    Row("ROLLBACK TO SAVEPOINT a", setup=("SAVEPOINT a",)),
    Row("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
    Row("PREPARE TRANSACTION 'ro_facts'", pg=(OK, "55000")),  # 55000: max_prepared_transactions = 0
    Row("COMMIT PREPARED 'ro_facts_none'", pg="42704", alone=True),
    Row("ROLLBACK PREPARED 'ro_facts_none'", pg="42704", alone=True),
    # reads
    Row("SELECT 1"),
    Row("SELECT * FROM t WHERE id = 1"),
    Row("VALUES (1), (2)"),
    Row("TABLE t"),
    Row("WITH x AS (SELECT v FROM t) SELECT * FROM x"),
    Row("SELECT * FROM t UNION ALL SELECT * FROM t"),
    Row("SELECT txid_current(), pg_current_xact_id()"),
    Row("SELECT * FROM t FOR UPDATE", pg=REFUSED),
    Row("SELECT * FROM t FOR NO KEY UPDATE", pg=REFUSED),
    Row("SELECT * FROM t FOR SHARE", pg=REFUSED),
    Row("SELECT * FROM t FOR KEY SHARE SKIP LOCKED", pg=REFUSED),
    Row("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", pg=REFUSED),
    Row("WITH d AS (DELETE FROM t WHERE id = 0 RETURNING *) SELECT * FROM d", pg=REFUSED),
    Row("WITH i AS (INSERT INTO t VALUES (0, 0) RETURNING id) SELECT 1", pg=REFUSED),
    Row("WITH u AS (UPDATE t SET v = v RETURNING 1) SELECT count(*) FROM u", pg=REFUSED),
    Row("SELECT 1 AS x INTO t_copy", pg=REFUSED),
    Row("SELECT nextval('s')", pg=REFUSED),
    Row("SELECT setval('s', 5)", pg=REFUSED),
    Row("SELECT id FROM t WHERE v < (SELECT nextval('s'))", pg=REFUSED),
    # settings and session state
    Row("SHOW work_mem"),
    Row("SHOW ALL"),
    Row("SET work_mem = '8MB'"),
    Row("SET LOCAL statement_timeout = '5s'"),
    Row("SET search_path = public"),
    Row("SET ROLE NONE"),
    Row("SET SESSION AUTHORIZATION DEFAULT"),
    Row("RESET work_mem"),
    Row("RESET ALL"),
    Row("SELECT set_config('work_mem', '8MB', false)"),
    Row("SELECT setseed(0.5)"),
    Row("SET CONSTRAINTS ALL DEFERRED"),
    Row("DISCARD PLANS"),
    Row("DISCARD SEQUENCES"),
    Row("DISCARD TEMP"),
    Row("DISCARD ALL", alone=True),
    Row("LISTEN ro_channel"),
    Row("UNLISTEN *"),
    # prepared statements and cursors
    Row("PREPARE r AS SELECT v FROM t WHERE id = $1"),
    Row("PREPARE w AS DELETE FROM t WHERE id = $1"),
    Row("EXECUTE r(1)", before=("PREPARE r AS SELECT v FROM t WHERE id = $1",),
        executes="SELECT v FROM t WHERE id = $1"),
    Row("EXECUTE w(0)", pg=REFUSED, before=("PREPARE w AS DELETE FROM t WHERE id = $1",),
        executes="DELETE FROM t WHERE id = $1"),
    Row("EXECUTE r(nextval('s')::int)", pg=REFUSED, before=("PREPARE r AS SELECT v FROM t WHERE id = $1",),
        executes="SELECT v FROM t WHERE id = $1"),
    Row("DEALLOCATE r", before=("PREPARE r AS SELECT 1",)),
    Row("DEALLOCATE ALL"),
    Row("DECLARE c CURSOR FOR SELECT * FROM t"),
    Row("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", pg=REFUSED),
    Row("FETCH 1 FROM c", setup=("DECLARE c CURSOR FOR SELECT * FROM t",)),
    Row("MOVE 1 IN c", setup=("DECLARE c CURSOR FOR SELECT * FROM t",)),
    Row("CLOSE c", setup=("DECLARE c CURSOR FOR SELECT * FROM t",)),
    # EXPLAIN
    Row("EXPLAIN SELECT * FROM t"),
    Row("EXPLAIN DELETE FROM t"),
    Row("EXPLAIN (ANALYZE false) DELETE FROM t"),
    Row("EXPLAIN SELECT nextval('s')"),
    Row("EXPLAIN ANALYZE SELECT * FROM t"),
    Row("EXPLAIN ANALYZE DELETE FROM t WHERE id = 0", pg=REFUSED),
    Row("EXPLAIN (ANALYZE false, ANALYZE true) UPDATE t SET v = v", pg=REFUSED),
    Row("EXPLAIN ANALYZE SELECT nextval('s')", pg=REFUSED),
    Row("EXPLAIN ANALYZE EXECUTE w(0)", pg=REFUSED, before=("PREPARE w AS DELETE FROM t WHERE id = $1",)),
    Row("EXPLAIN ANALYZE EXECUTE r(1)", stricter="the gateway does not follow EXECUTE inside EXPLAIN",
        before=("PREPARE r AS SELECT v FROM t WHERE id = $1",)),
    # COPY
    Row("COPY t TO STDOUT"),
    Row("COPY (SELECT v FROM t) TO STDOUT (FORMAT csv)"),
    Row("COPY (DELETE FROM t WHERE id = 0 RETURNING *) TO STDOUT", pg=REFUSED),
    Row("COPY t FROM STDIN", pg=REFUSED),
    Row("COPY t TO '/dev/null'", stricter="writes a server file"),
    Row("COPY t TO PROGRAM 'cat > /dev/null'", stricter="runs a program on the server"),
    Row("COPY tmp FROM STDIN", stricter="writes a table (temporary: needs the catalog to tell)",
        before=("CREATE TEMP TABLE tmp (a int)",)),
    # writes
    Row("INSERT INTO t VALUES (0, 0)", pg=REFUSED),
    Row("UPDATE t SET v = v WHERE id = 1", pg=REFUSED),
    Row("DELETE FROM t WHERE id = 0", pg=REFUSED),
    Row("MERGE INTO t USING (SELECT 1 AS id) s ON t.id = s.id WHEN MATCHED THEN DELETE", pg=REFUSED),
    Row("TRUNCATE t", pg=REFUSED),
    Row("INSERT INTO tmp VALUES (1)", stricter="writes a table (temporary: needs the catalog to tell)",
        before=("CREATE TEMP TABLE tmp (a int)",)),
    # DDL, privileges
    Row("CREATE TABLE z (a int)", pg=REFUSED),
    Row("CREATE TEMP TABLE z (a int)", pg=REFUSED),
    Row("CREATE TABLE z AS SELECT 1 AS a", pg=REFUSED),
    Row("CREATE VIEW zv AS SELECT 1 AS a", pg=REFUSED),
    Row("CREATE INDEX ON t (v)", pg=REFUSED),
    Row("ALTER TABLE t ADD COLUMN w int", pg=REFUSED),
    Row("DROP TABLE t", pg=REFUSED),
    Row("COMMENT ON TABLE t IS 'x'", pg=REFUSED),
    Row("GRANT SELECT ON t TO PUBLIC", pg=REFUSED),
    Row("REVOKE SELECT ON t FROM PUBLIC", pg=REFUSED),
    Row("CREATE ROLE ro_facts_role", pg=REFUSED),
    Row("CREATE FUNCTION zf() RETURNS int LANGUAGE sql AS 'SELECT 1'", pg=REFUSED),
    Row("REFRESH MATERIALIZED VIEW mv", pg=REFUSED),
    Row("CREATE SCHEMA zs", pg=REFUSED),
    Row("ALTER SEQUENCE s RESTART", pg=REFUSED),
    # maintenance: PostgreSQL runs it in a read-only transaction (it changes no data)
    Row("ANALYZE t"),
    Row("VACUUM t", alone=True),
    Row("CLUSTER t USING t_pkey"),
    Row("REINDEX TABLE t"),
    Row("CHECKPOINT"),
    # what PostgreSQL runs in a read-only transaction but read_only is false for
    Row("DO $$BEGIN END$$", stricter=CODE),
    Row("DO $$BEGIN DELETE FROM t WHERE id = 0; END$$", pg=REFUSED),
    Row("CALL p()", stricter=CODE),
    Row("LOAD 'plpgsql'", stricter=CODE),
    # (an unknown setting: 42704, past the read-only check; a real one would rewrite the shared
    # test cluster's postgresql.auto.conf)
    Row("ALTER SYSTEM RESET ro_facts.unused", pg="42704", alone=True, stricter="writes the server's configuration"),
    Row("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", stricter="blocks other sessions until the transaction ends"),
    Row("LOCK TABLE t IN ACCESS SHARE MODE", stricter="blocks other sessions until the transaction ends"),
    Row("NOTIFY ro_channel", stricter=OTHERS),
    Row("SELECT pg_notify('ro_channel', 'x')", stricter=OTHERS),
    Row("SELECT pg_advisory_lock(1)", stricter=OTHERS),
    Row("SELECT pg_advisory_xact_lock(1)", stricter=OTHERS),
    Row("SELECT pg_try_advisory_lock_shared(1)", stricter=OTHERS),
    Row("SELECT pg_advisory_unlock_all()", stricter=OTHERS),
    Row("SELECT pg_terminate_backend(0)", stricter=OTHERS),
    Row("SELECT pg_cancel_backend(0)", stricter=OTHERS),
    Row("SELECT pg_reload_conf()", stricter=OTHERS),
    Row("SELECT pg_stat_reset()", stricter=WRITES),
    Row("SELECT lo_create(0)", stricter=WRITES),
    Row("SELECT lo_from_bytea(0, 'x')", stricter=WRITES),
    Row("SELECT lo_unlink(lo_create(0))", stricter=WRITES),
    Row("SELECT lo_export(0, '/dev/null')", pg="42704", stricter=WRITES),  # no large object 0: past the check
    Row("SELECT brin_summarize_new_values('t_brin')", stricter=WRITES),
    Row("SELECT pg_logical_emit_message(true, 'ro', 'x')", stricter=WRITES),
    Row("SELECT pg_create_restore_point('ro_facts')", stricter=WRITES),
]


@pytest.fixture(scope="module")
def ro_db(pg):
    pg.execute("CREATE DATABASE ro_facts")
    pg.execute("""
        CREATE TABLE t (id int PRIMARY KEY, v int);
        INSERT INTO t VALUES (1, 1), (2, 2);
        CREATE INDEX t_brin ON t USING brin (v);
        CREATE SEQUENCE s;
        CREATE PROCEDURE p() LANGUAGE plpgsql AS $$BEGIN END$$;
        CREATE MATERIALIZED VIEW mv AS SELECT 1 AS x;
    """, dbname="ro_facts")
    conn = psycopg.connect(pg.dsn(dbname="ro_facts"), autocommit=True, prepare_threshold=None)
    yield conn
    conn.close()


def _run(cur, sql: str) -> None:
    if sql.startswith("COPY") and ("STDOUT" in sql or "STDIN" in sql):
        with cur.copy(sql) as copy:
            if "STDOUT" in sql:
                for _ in copy:
                    pass
    else:
        cur.execute(sql)


def postgresql_verdict(conn, row: Row) -> str:
    """What PostgreSQL answers to the row's statement in a read-only transaction."""
    cur = conn.cursor()
    try:
        for sql in row.before:
            cur.execute(sql)
        if row.alone:
            cur.execute("SET default_transaction_read_only = on")
        else:
            cur.execute("BEGIN READ ONLY")
        for sql in row.setup:
            cur.execute(sql)
        try:
            _run(cur, row.sql)
        except psycopg.Error as e:
            return e.sqlstate or "?"
        return OK
    finally:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        if row.sql.startswith("PREPARE TRANSACTION"):  # if the cluster allows prepared transactions
            if conn.execute("SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'ro_facts'").fetchone()[0]:
                conn.execute("ROLLBACK PREPARED 'ro_facts'")
        conn.execute("RESET default_transaction_read_only")
        conn.execute("DISCARD ALL")  # prepared statements, cursors, LISTEN, advisory locks, temp tables


def fact(row: Row) -> bool:
    """read_only as the gateway judges the statement: EXECUTE also as the statement it runs."""
    facts = analyze(row.sql)
    assert len(facts) == 1
    ro = facts[0].read_only
    if row.executes:
        assert facts[0].command == "EXECUTE"
        ro = ro and analyze(row.executes)[0].read_only
    return ro


@pytest.mark.parametrize("row", TABLE, ids=str)
def test_read_only_is_what_a_read_only_transaction_may_run(ro_db, row):
    verdict = postgresql_verdict(ro_db, row)
    expected = row.pg if isinstance(row.pg, tuple) else (row.pg,)
    assert verdict in expected, f"PostgreSQL answered {verdict} to {row.sql!r}; the table says {row.pg}"
    allowed = verdict != REFUSED
    if row.stricter:
        assert allowed, "a stricter row must be one PostgreSQL runs"
        assert fact(row) is False, f"{row.sql!r} {row.stricter}: read_only must be false"
    else:
        assert fact(row) is allowed, (f"PostgreSQL {'runs' if allowed else 'refuses'} {row.sql!r} in a "
                                      f"read-only transaction; read_only says {fact(row)}")


def test_the_table_covers_both_verdicts_and_every_stricter_reason():
    """Guards the table itself: it must hold refusals, reads, and the stricter cases the docs list."""
    assert sum(r.pg == REFUSED for r in TABLE) >= 30
    assert sum(r.pg == OK and not r.stricter for r in TABLE) >= 40
    assert {CODE, OTHERS, WRITES} <= {r.stricter for r in TABLE}


@pytest.mark.parametrize("sql,changes", [
    ("SET work_mem = '8MB'", True),
    ("SET LOCAL work_mem = '8MB'", True),
    ("RESET ALL", True),
    ("DISCARD ALL", True),
    ("LISTEN x", True),
    ("UNLISTEN *", True),
    ("PREPARE r AS SELECT 1", True),
    ("DEALLOCATE r", True),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", True),
    ("CLOSE c", True),
    ("LOAD 'plpgsql'", True),
    ("SELECT set_config('work_mem', '8MB', false)", True),
    ("SELECT setseed(0.1)", True),
    ("SELECT pg_advisory_lock(1)", True),
    ("SELECT pg_advisory_unlock_all()", True),
    ("CREATE TEMP TABLE z (a int)", True),
    ("SELECT 1 AS a INTO TEMP z", True),
    ("CREATE TEMP VIEW zv AS SELECT 1", True),
    ("DO $$BEGIN PERFORM set_config('a.b', 'c', false); END$$", True),
    ("CALL p()", True),
    ("EXPLAIN ANALYZE SELECT set_config('a.b', 'c', false)", True),
    ("EXPLAIN SELECT set_config('a.b', 'c', false)", False),
    ("SELECT 1", False),
    ("BEGIN", False),
    ("COMMIT", False),
    ("SELECT pg_advisory_xact_lock(1)", False),
    ("INSERT INTO t VALUES (1)", False),
    ("CREATE TABLE z (a int)", False),
    ("FETCH 1 FROM c", False),
    ("SHOW work_mem", False),
])
def test_changes_session(sql, changes):
    assert analyze(sql)[0].changes_session is changes

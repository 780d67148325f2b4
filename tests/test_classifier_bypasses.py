"""The statements hoop.dev's inspector publishes as having got writes past statement
classifiers are judged as the writes they are.

Each bypass is first shown to be a write on PostgreSQL itself (inside ``BEGIN READ ONLY`` it is
refused with 25006), then sent by an agent through the gateway under the first rule a rule
author writes (``deny`` unless ``stmt.read_only``): it is refused with 42501 naming the rule,
and the table is unchanged. The look-alikes that only read (a CTE named ``delete``, ``DELETE``
inside a string or a dollar-quoted body) still run.
"""

from __future__ import annotations

import psycopg
import pytest

from pooler.sql.analyzer import analyze
from tests.conftest import upstream_entry
from tests.gwproc import GatewayProc
from tests.wire import Raw, errors, query

RULE = '''
def on_statement(stmt, session):
    if "agents" in session.groups and not stmt.read_only:
        return deny("agents are read-only")
    return None
'''

BYPASSES = {
    # a classifier that ends the string at \' reads the DELETE as part of a string constant
    "escape string with a backslash-quote": "SELECT E'O\\'Brien'; DELETE FROM t WHERE id = 1",
    "data-modifying CTE (DELETE)": "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
    "data-modifying CTE (UPDATE) after a reading one":
        "WITH a AS (SELECT 1), b AS (UPDATE t SET v = 0 WHERE id = 1 RETURNING id) SELECT * FROM a",
    "data-modifying CTE (INSERT)": "WITH i AS (INSERT INTO t VALUES (99, 99) RETURNING id) SELECT count(*) FROM i",
    # a classifier that counts parentheses to find the end of a statement
    "parenthesis inside $$": "SELECT $$)$$; DELETE FROM t WHERE id = 1",
    "parentheses and quotes inside $tag$": "SELECT $tag$ ( $$ ' $tag$, (1); DELETE FROM t WHERE id = 1",
    "MERGE ... WHEN MATCHED THEN DELETE":
        "MERGE INTO t USING (SELECT 1 AS id) s ON t.id = s.id WHEN MATCHED THEN DELETE",
    "COPY (DELETE ... RETURNING *) TO STDOUT": "COPY (DELETE FROM t WHERE id = 1 RETURNING *) TO STDOUT",
    "EXPLAIN ANALYZE DELETE": "EXPLAIN ANALYZE DELETE FROM t WHERE id = 1",
    "EXPLAIN (ANALYZE) with options": "EXPLAIN (COSTS off, ANALYZE on) UPDATE t SET v = 0 WHERE id = 1",
    "a CTE named delete that deletes": "WITH delete AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM delete",
    "DO block": "DO $$BEGIN DELETE FROM t WHERE id = 1; END$$",
    "DO block with a parenthesis in a string": "DO $x$ BEGIN PERFORM ')'; DELETE FROM t WHERE id = 1; END $x$",
    "CALL": "CALL wipe(1)",
}

LOOK_ALIKES = {
    "escape string alone": ("SELECT E'O\\'Brien'", "O'Brien"),
    "DELETE inside $$": ("SELECT $$); DELETE FROM t WHERE id = 1; ($$", "); DELETE FROM t WHERE id = 1; ("),
    "a CTE named delete that reads": ("WITH delete AS (SELECT v FROM t WHERE id = 1) SELECT v FROM delete", "1"),
    "DELETE in a string": ("SELECT 'DELETE FROM t'", "DELETE FROM t"),
}


@pytest.fixture(scope="module")
def bypass_db(pg):
    pg.execute("CREATE DATABASE bypass")
    pg.execute("""
        CREATE TABLE t (id int PRIMARY KEY, v int);
        INSERT INTO t SELECT g, g FROM generate_series(1, 5) g;
        CREATE PROCEDURE wipe(int) LANGUAGE sql AS $$ DELETE FROM t WHERE id = $1 $$;
    """, dbname="bypass")
    return "bypass"


@pytest.fixture(scope="module")
def direct(pg, bypass_db):
    conn = psycopg.connect(pg.dsn(dbname=bypass_db), autocommit=True, prepare_threshold=None)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def agw(pg, bypass_db, tmp_path_factory):
    """One gateway for the module (every test leaves the table as it found it)."""
    rules = tmp_path_factory.mktemp("gwrules") / "rules"
    rules.mkdir()
    (rules / "agents.star").write_text(RULE)
    g = GatewayProc({"bypass": upstream_entry(pg, bypass_db)}, settings={"rules_dir": str(rules)},
                    users={"agent": "groups=agents"}, workdir=str(tmp_path_factory.mktemp("gw")))
    g.start()
    yield g
    g.stop()


def table_state(direct) -> list:
    return direct.execute("SELECT id, v FROM t ORDER BY id").fetchall()


def refused_in_a_read_only_transaction(direct, sql: str, before: str = "") -> str | None:
    """The SQLSTATE PostgreSQL refuses ``sql`` with inside BEGIN READ ONLY (None: it ran)."""
    try:
        direct.execute("BEGIN READ ONLY")
        if before:
            direct.execute(before)
        cur = direct.cursor()
        if sql.startswith("COPY"):
            with cur.copy(sql) as copy:
                for _ in copy:
                    pass
        else:
            cur.execute(sql)
        return None
    except psycopg.Error as e:
        return e.sqlstate
    finally:
        direct.execute("ROLLBACK")
        direct.execute("DEALLOCATE ALL")


@pytest.mark.parametrize("sql", BYPASSES.values(), ids=BYPASSES.keys())
def test_a_published_bypass_is_a_write_in_the_facts(sql):
    facts = analyze(sql)
    assert not all(f.read_only for f in facts)
    writes = [f for f in facts if not f.read_only]
    if writes[0].command not in ("DO", "CALL"):  # their bodies are not seen: not read-only, no tables
        assert "public.t" in writes[0].tables_written


@pytest.mark.parametrize("sql", BYPASSES.values(), ids=BYPASSES.keys())
def test_a_published_bypass_is_refused_and_writes_nothing(direct, agw, sql):
    assert refused_in_a_read_only_transaction(direct, sql) == "25006"  # it is a write
    before = table_state(direct)
    c = Raw(agw, "agent", "bypass")
    replies = c.run(query(sql))
    c.close()
    errs = errors(replies)
    assert errs and errs[0]["C"] == "42501", replies
    assert "refused by rules/agents.star" in errs[0]["M"] and "agents are read-only" in errs[0]["M"]
    assert not any(t in (b"D", b"C", b"H") for t, _ in replies)  # nothing ran: no rows, tags or COPY
    assert table_state(direct) == before


@pytest.mark.parametrize("sql,value", LOOK_ALIKES.values(), ids=LOOK_ALIKES.keys())
def test_a_look_alike_that_only_reads_runs(direct, agw, sql, value):
    assert refused_in_a_read_only_transaction(direct, sql) is None
    assert all(f.read_only for f in analyze(sql))
    c = Raw(agw, "agent", "bypass")
    replies = c.run(query(sql))
    c.close()
    assert not errors(replies), replies
    rows = [body for t, body in replies if t == b"D"]
    assert len(rows) == 1 and rows[0].endswith(value.encode())


def test_execute_of_a_prepared_write_is_judged_as_the_write(direct, agw):
    """PREPARE writes nothing (read-only, as PostgreSQL says); EXECUTE runs a DELETE: the
    gateway judges it as that DELETE, in the message that prepared it or in a later one."""
    prepare = "PREPARE w AS DELETE FROM t WHERE id = $1"
    assert refused_in_a_read_only_transaction(direct, "EXECUTE w(1)", before=prepare) == "25006"
    assert analyze("EXECUTE w(1)")[0].read_only  # alone, EXECUTE is judged by what it runs
    before = table_state(direct)
    c = Raw(agw, "agent", "bypass")
    # in one message
    errs = errors(c.run(query(f"BEGIN; {prepare}; EXECUTE w(1)")))
    assert errs and errs[0]["C"] == "42501" and "agents are read-only" in errs[0]["M"]
    assert c.run(query("ROLLBACK"))[-1] == (b"Z", b"I")
    # message by message, inside a transaction (SQL-level statements last for it in transaction pooling)
    assert not errors(c.run(query("BEGIN")))
    assert not errors(c.run(query(prepare)))
    errs = errors(c.run(query("EXECUTE w(1)")))
    assert errs and errs[0]["C"] == "42501" and "agents are read-only" in errs[0]["M"]
    c.run(query("ROLLBACK"))
    # a prepared read runs
    assert not errors(c.run(query("BEGIN")))
    assert not errors(c.run(query("PREPARE r AS SELECT v FROM t WHERE id = $1")))
    replies = c.run(query("EXECUTE r(2)"))
    assert not errors(replies) and [b for t, b in replies if t == b"D"][0].endswith(b"2")
    c.run(query("COMMIT"))
    c.close()
    assert table_state(direct) == before

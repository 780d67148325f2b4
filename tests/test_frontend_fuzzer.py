"""A seeded fuzzer sends mutated frontend messages through the gateway to the real test
cluster; canary sessions on the same pool (one server, so every canary statement runs on the
server the fuzzer just used) must see no open transaction, no lock, no setting the fuzzer made,
and no error.

The fuzz sessions start from valid streams (simple and extended queries, transactions that
write and lock, COPY, named statements, SET, Flush without Sync) and mutate them: a byte
flipped, a length field changed, the stream cut off, bytes inserted, a message dropped or
repeated, a type byte replaced; then the client reads a little or vanishes at once. The run is
bounded in count and time, and the same seed gives the same sessions.
"""

from __future__ import annotations

import random
import socket
import struct
import time

import psycopg
import pytest

from pooler.protocol import messages as m
from tests.conftest import upstream_entry
from tests.wire import FLUSH, SYNC, bind, close, describe, execute, msg, parse, query

SEED = 20261203
SESSIONS = 250
TIME_BOUND = 20.0  # seconds of fuzzing at most

RULE = '''
def on_statement(stmt, session):
    # the fuzzer may write and lock its table, not change the schema or call what writes elsewhere
    if "fuzz" in session.groups and not stmt.read_only and stmt.command not in (
            "INSERT", "UPDATE", "DELETE", "COPY", "LOCK TABLE"):
        return deny("fuzzer: %s" % stmt.command)
    return None
'''

VALID = [
    query("SELECT 1"),
    query("BEGIN; UPDATE fz SET v = v + 1 WHERE id = 1; SELECT * FROM fz FOR UPDATE"),
    query("BEGIN") + query("LOCK TABLE fz IN ACCESS EXCLUSIVE MODE") + query("SELECT count(*) FROM fz"),
    query("SET fuzz.marker = 'leaked'; SELECT set_config('fuzz.other', 'leaked', false)"),
    parse("", "UPDATE fz SET v = 0 WHERE id = 2") + bind() + execute() + FLUSH,
    parse("", "SELECT v FROM fz WHERE id = 1") + bind() + describe(b"P") + execute() + SYNC,
    parse("st", "SELECT 2") + bind("", "st") + execute() + close(b"S", "st") + SYNC,
    query("COPY fz FROM STDIN") + msg(b"d", b"10\t10\n") + msg(b"d", b"11\t11\n"),
    query("COPY fz TO STDOUT"),
    query("SELECT repeat('x', 5000)"),
    query("BEGIN; SAVEPOINT a; INSERT INTO fz VALUES (20, 20); ROLLBACK TO a"),
    query("SELECT 1/0") + parse("", "SELECT 1") + SYNC,
]

TYPES = b"QPBDESHCXdcfFpxyz\x00\xff"


def _messages(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 5 <= len(stream):
        (n,) = struct.unpack_from("!i", stream, pos + 1)
        out.append(stream[pos : pos + 1 + n])
        pos += 1 + n
    return out


def mutate(rng: random.Random, stream: bytes) -> bytes:
    msgs = _messages(stream)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        i = rng.randrange(len(msgs))
        mb = bytearray(msgs[i])
        if op == 0 and len(mb) > 5:  # flip a byte of the body
            j = rng.randrange(5, len(mb))
            mb[j] ^= 1 << rng.randrange(8)
        elif op == 1:  # a length field changed
            n = rng.choice([0, 3, 4, 5, len(mb) - 2, len(mb), len(mb) + 7, 1 << 20, (1 << 31) - 1, -1])
            mb[1:5] = struct.pack("!i", max(-(1 << 31), min(n, (1 << 31) - 1)))
        elif op == 2:  # a type byte replaced
            mb[0] = rng.choice(TYPES)
        elif op == 3:  # bytes inserted
            j = rng.randrange(len(mb) + 1)
            mb[j:j] = rng.randbytes(rng.randint(1, 8))
        elif op == 4 and len(msgs) > 1:  # a message dropped
            del msgs[i]
            continue
        elif op == 5:  # a message repeated
            msgs.insert(i, bytes(mb))
        elif op == 6:  # a message cut short (the stream ends there)
            msgs[i:] = [bytes(mb[: rng.randrange(1, len(mb) + 1)])]
            break
        else:  # a NUL terminator removed or added
            j = bytes(mb).rfind(b"\x00")
            if j > 4:
                del mb[j]
            else:
                mb += b"\x00"
        msgs[i] = bytes(mb)
    return b"".join(msgs)


def fuzz_session(gw, rng: random.Random) -> bytes:
    """One fuzz client: log in, send a mutated stream, read a little or vanish; what it got."""
    s = socket.create_connection((gw.host, gw.port), timeout=5)
    got = b""
    try:
        s.sendall(m.startup_message({"user": "fuzzer", "database": "fuzz"}))
        while b"Z\x00\x00\x00\x05" not in got:  # ReadyForQuery of the login
            chunk = s.recv(65536)
            assert chunk, "the gateway closed a valid login"
            got += chunk
        got = b""
        stream = b"".join(rng.choice(VALID) for _ in range(rng.randint(1, 3)))
        s.sendall(mutate(rng, stream))
        if rng.random() < 0.6:  # read replies until the gateway closes us or goes quiet (bounded)
            s.settimeout(0.1)
            deadline = time.monotonic() + 0.5
            try:
                while time.monotonic() < deadline:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            except (TimeoutError, socket.timeout, ConnectionError):
                pass
        if rng.random() < 0.3:
            try:
                s.sendall(b"X\x00\x00\x00\x04")
            except OSError:
                pass
    except OSError:
        pass  # closed by the gateway while sending: that session is over
    finally:
        if rng.random() < 0.5:  # vanish with a reset, not a FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    return got


CANARY = ("SELECT now() = statement_timestamp(), pg_current_xact_id_if_assigned() IS NULL, "
          "(SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND (locktype = 'advisory' "
          " OR (locktype = 'relation' AND relation = 'fz'::regclass))), "
          "coalesce(current_setting('fuzz.marker', true), '') || coalesce(current_setting('fuzz.other', true), '')")


@pytest.fixture
def fuzz_db(pg):
    pg.execute("DROP DATABASE IF EXISTS fuzz")
    pg.execute("CREATE DATABASE fuzz")
    pg.execute("CREATE TABLE fz (id int, v int); INSERT INTO fz VALUES (1, 1), (2, 2)", dbname="fuzz")
    yield "fuzz"


def test_mutated_frontend_messages_leave_nothing_behind_for_the_next_client(pg, fuzz_db, gw_factory, tmp_path):
    rules = tmp_path / "fuzzrules" / "rules"
    rules.mkdir(parents=True)
    (rules / "fuzz.star").write_text(RULE)
    gw = gw_factory(settings={"pool_mode": "transaction", "default_pool_size": 1, "query_wait_timeout": 10,
                              "rules_dir": str(rules)},
                    users={"fuzzer": "groups=fuzz", "canary": "groups=canary"},
                    databases={"fuzz": upstream_entry(pg, fuzz_db)})
    canaries = [psycopg.connect(gw.dsn(user="canary", dbname="fuzz"), autocommit=True, prepare_threshold=None)
                for _ in range(2)]
    rng = random.Random(SEED)
    seen = {"protocol violations": 0, "statements run": 0, "refusals": 0}
    started = time.monotonic()
    done = 0
    try:
        while done < SESSIONS and time.monotonic() - started < TIME_BOUND:
            got = fuzz_session(gw, rng)
            seen["protocol violations"] += b"08P01" in got
            seen["statements run"] += b"C\x00\x00\x00" in got
            seen["refusals"] += b"42501" in got or b"42601" in got
            fresh, no_xid, locks, settings_left = canaries[done % 2].execute(CANARY).fetchone()
            assert (fresh, no_xid, locks, settings_left) == (True, True, 0, ""), (
                f"session {done} (seed {SEED}) left: transaction open={not fresh}, xid={not no_xid}, "
                f"locks={locks}, settings={settings_left!r}")
            done += 1
    finally:
        for c in canaries:
            c.close()
    print(f"{done} fuzz sessions in {time.monotonic() - started:.1f} s: {seen}")
    assert done >= 50, f"only {done} fuzz sessions in {TIME_BOUND} s"
    # the fuzzer reached every layer: framing errors, statements that ran, refusals
    assert all(seen.values()), seen
    # and PostgreSQL itself agrees: no transaction is left open, no lock on the table
    with psycopg.connect(pg.dsn(dbname=fuzz_db), autocommit=True) as direct:
        left = direct.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'fuzz' AND "
                              "state LIKE 'idle in transaction%'").fetchone()[0]
        locks = direct.execute("SELECT count(*) FROM pg_locks WHERE relation = 'fz'::regclass").fetchone()[0]
        assert (left, locks) == (0, 0)

"""What a recording holds of a governed session: the decision of each statement, and the rows
exactly as the client was shown them, masked; the raw personal values never, anywhere in the
files."""

from __future__ import annotations

import psycopg
import pytest

from pooler.recording import files as rf
from tests.masking_helpers import MASKED, USERS, assert_no_secret
from tests.conftest import upstream_entry
from tests.gwproc import REPO
from tests.recording_helpers import of, wait_logged_out


@pytest.fixture
def rec_shop(pg, demo_shop, gw_factory, tmp_path):
    """-> make(pool_mode): the shipped rules in front of the demo shop, recording to tmp_path/rec."""
    def make(mode="transaction"):
        d = tmp_path / "rec"
        g = gw_factory(settings={"rules_dir": str(REPO / "rules"), "mask_hash_key": "test-key", "record_dir": str(d),
                                 "record_fsync": "always", "record_results": 5, "pool_mode": mode},
                       users=USERS, databases={"shop": upstream_entry(pg, demo_shop)})
        return g, d
    return make


def all_text(d) -> str:
    return "\n".join(b"\n".join(rf.read_lines(f.path)[0]).decode() for f in rf.list_files(d))


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_masked_rows_are_recorded_as_shown_and_never_raw(rec_shop, raw_pii, mode):
    g, d = rec_shop(mode)
    with psycopg.connect(g.dsn(user="agent", dbname="shop"), autocommit=True) as c:
        shown_simple = [list(r) for r in c.execute(MASKED, prepare=False).fetchall()]
        shown_ext = [list(r) for r in c.execute("SELECT email, ssn FROM customers WHERE id = %s", (2,)).fetchall()]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM customers")
    (s,) = wait_logged_out(d)
    stmts = of(s, "stmt")
    masked_stmt = next(x for x in stmts if x["sql"] == MASKED)
    assert masked_stmt["action"] == "mask" and masked_stmt["rule"].endswith(".star") and masked_stmt["masks"]
    rows = {r["q"]: r["rows"] for r in of(s, "rows")}
    assert rows[masked_stmt["q"]] == shown_simple  # exactly what the client received
    ext = next(x for x in stmts if x["sql"].startswith("SELECT email, ssn FROM customers WHERE id = $1"))
    assert ext["route"] == "extended" and rows[ext["q"]] == shown_ext
    (bind,) = [b for b in of(s, "bind") if b["q"] == ext["q"]]
    assert bind["params"] in (["2"], [{"hex": "0002"}], [{"hex": "00000002"}], [{"hex": "0000000000000002"}])
    masked = {c[0].rsplit(".", 1)[-1] for m in of(s, "masked") for c in m["columns"]}
    assert {"email", "ssn", "card_number"} <= masked
    denied = next(x for x in stmts if x["sql"] == "DELETE FROM customers")
    assert denied["action"] == "deny" and denied["reason"]
    (ref,) = [r for r in of(s, "refused") if r["q"] == denied["q"]]
    assert ref["sqlstate"] == "42501"
    g.stop()
    assert_no_secret(all_text(d), raw_pii)


def test_a_privileged_reader_is_recorded_unmasked_as_shown(rec_shop, raw_pii):
    """The recording is what the client saw: a pii-reader saw real values, so they are recorded
    (the files are as sensitive as the client's screen, no more)."""
    g, d = rec_shop()
    with psycopg.connect(g.dsn(user="dba", dbname="shop"), autocommit=True) as c:
        shown = [list(r) for r in c.execute(MASKED).fetchall()]
    (s,) = wait_logged_out(d)
    (rows,) = of(s, "rows")
    assert rows["rows"] == shown
    with pytest.raises(AssertionError, match="raw values"):  # the files' check above would see them
        assert_no_secret(all_text(d), raw_pii)

"""record_failure: while recordings cannot be written (directory removed, disk full), new
statements are refused with a clear error (block, the default) or go on with the loss counted
(continue); either way the log and the metrics say so, and once writing works again a gap
record counts what was lost and the chain still verifies."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import psycopg
import pytest

from pooler.recording.reader import iter_events
from pooler.recording.verify import verify
from tests.gwproc import free_port
from tests.test_admin_console import ADMIN, console, show
from tests.test_metrics import scrape, value


def run(c, sql="SELECT 1"):
    """-> None if the statement ran, else its (sqlstate, message)."""
    try:
        c.execute(sql)
        return None
    except psycopg.Error as e:
        return (e.sqlstate, str(e.diag.message_primary))


def until(pred, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def start(gw_factory, tmp_path, d, policy, **extra):
    mport = free_port()
    g = gw_factory(settings={"record_dir": str(d), "record_failure": policy, "record_fsync": "always",
                             "metrics_listen": f"127.0.0.1:{mport}", **ADMIN, **extra})
    return g, mport


def test_block_refuses_statements_while_the_directory_is_gone(gw_factory, tmp_path):
    d = tmp_path / "rec"
    g, mport = start(gw_factory, tmp_path, d, "block")
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        assert run(c) is None
        shutil.rmtree(d)
        refusal = until(lambda: run(c, "SELECT 2"), "a statement refused")
        assert refusal[0] == "58030"
        assert "session recordings cannot be written (record_failure = block)" in refusal[1]
        assert "does not exist" in refusal[1] or "removed" in refusal[1]
        assert run(c, "SELECT 3")[0] == "58030"  # still refused: nothing runs unrecorded
        m = scrape(mport)
        assert value(m, "pooler_recording_blocked") == 1 and value(m, "pooler_recording_write_failures_total") >= 1
        with console(g) as adm:  # the console still answers, and says why
            (row,) = show(adm, "RECORDINGS")
            assert row["blocked"] == "yes" and row["failing"] in refusal[1] and row["write_failures"] >= 1
        d.mkdir()
        until(lambda: run(c, "SELECT 4") is None, "statements accepted again")
        assert value(scrape(mport), "pooler_recording_blocked") == 0
        with console(g) as adm:
            (row,) = show(adm, "RECORDINGS")
            assert row["blocked"] == "no" and row["failing"] == "" and row["dir"] == str(d)
    g.wait_log("recordings cannot be written")
    g.wait_log("statements are refused until recordings can be written again")
    g.wait_log("recordings are written again")
    recs = until(lambda: [e for e in iter_events(d, housekeeping=True) if e["t"] == "logout"] and
                 list(iter_events(d, housekeeping=True)), "the logout recorded")
    gaps = [e for e in recs if e["t"] == "gap"]
    assert gaps and gaps[0]["lost"] >= 1
    assert "SELECT 4" in [e["sql"] for e in recs if e["t"] == "stmt"]


def test_continue_lets_statements_run_and_counts_the_loss(gw_factory, tmp_path):
    d = tmp_path / "rec"
    g, mport = start(gw_factory, tmp_path, d, "continue")
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        assert run(c) is None
        shutil.rmtree(d)
        until(lambda: value(scrape(mport), "pooler_recording_write_failures_total") >= 1 or run(c, "SELECT 2"),
              "the writer noticed")
        for _ in range(5):
            assert run(c, "SELECT 'unrecorded'") is None
        assert value(scrape(mport), "pooler_recording_blocked") == 0
        d.mkdir()
        until(lambda: any(e["t"] == "gap" for e in iter_events(d, housekeeping=True)), "a gap record")
        assert run(c, "SELECT 'recorded again'") is None
    g.wait_log("recordings cannot be written")
    assert value(scrape(mport), "pooler_recording_lost_total") >= 1
    recs = until(lambda: [e for e in iter_events(d) if e["t"] == "logout"] and list(iter_events(d)), "logout")
    assert "SELECT 'recorded again'" in [e["sql"] for e in recs if e["t"] == "stmt"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 kB tmpfs (root only): a disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "rec"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(d):
    filler = d / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass  # full
    finally:
        os.close(fd)
    return filler


def test_block_refuses_statements_while_the_disk_is_full(gw_factory, tmp_path, tiny_disk):
    g, mport = start(gw_factory, tmp_path, tiny_disk, "block", record_compression="none")
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        assert run(c) is None
        filler = fill(tiny_disk)
        refusal = until(lambda: run(c, "SELECT 'x' || repeat('y', 2000)"), "a statement refused")
        assert refusal[0] == "58030" and "no space left" in refusal[1]
        filler.unlink()
        until(lambda: run(c, "SELECT 'after'") is None, "statements accepted again")
    recs = until(lambda: [e for e in iter_events(tiny_disk, housekeeping=True) if e["t"] == "logout"] and
                 list(iter_events(tiny_disk, housekeeping=True)), "logout")
    assert any(e["t"] == "gap" and "no space" in e["reason"] for e in recs)
    g.stop()
    rep = verify(tiny_disk)
    assert rep.ok, rep.problems  # the chain survived: the failed write was cut back to whole records


@pytest.fixture
def read_only_later(tmp_path):
    """-> (directory, make_read_only()): a bind mount of its own that can be remounted
    read-only while the gateway runs (root only; a permission bit does not stop root)."""
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    d = tmp_path / "rec"
    d.mkdir()
    r = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {r.stderr.strip()}")

    def make_read_only(ro=True):
        opt = "remount,bind,ro" if ro else "remount,bind,rw"
        r = subprocess.run(["mount", "-o", opt, str(d)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    try:
        yield d, make_read_only
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_block_refuses_statements_while_the_directory_is_read_only(gw_factory, tmp_path, read_only_later):
    """The file being written stays writable through its descriptor; the next file cannot be
    created (rotation at 4 kB): from then on statements are refused, until writing works."""
    d, make_read_only = read_only_later
    g, mport = start(gw_factory, tmp_path, d, "block", record_rotate_size="4kB")
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        assert run(c) is None
        make_read_only()
        refusal = until(lambda: run(c, "SELECT repeat('x', 500)"), "a statement refused")
        assert refusal[0] == "58030" and "Read-only file system" in refusal[1]
        make_read_only(False)
        until(lambda: run(c, "SELECT 'writable again'") is None, "statements accepted again")
    recs = until(lambda: [e for e in iter_events(d, housekeeping=True) if e["t"] == "logout"] and
                 list(iter_events(d, housekeeping=True)), "logout")
    assert any(e["t"] == "gap" for e in recs)
    g.stop()
    rep = verify(d)
    assert rep.ok, rep.problems


def test_a_recorder_that_fails_blocks_statements_rather_than_lose_them(pg, tmp_path, monkeypatch):
    """A record that cannot be made (here: a statement text the recorder is made to choke on)
    is a recording failure like a disk error: under block, nothing runs from then on."""
    from tests.conftest import upstream_entry
    from tests.inproc import LiveGateway

    d = tmp_path / "rec"
    (tmp_path / "gw").mkdir()
    lg = LiveGateway(databases={"postgres": upstream_entry(pg)},
                     settings={"record_dir": str(d), "record_fsync": "always"}, workdir=str(tmp_path / "gw"))
    lg.start()
    try:
        from pooler.gateway import recorder as recorder_module

        real = recorder_module.may_hold_secret

        def choke(sql):  # what the recorder calls while making a statement's record
            if "choke" in sql:
                raise RuntimeError("boom")
            return real(sql)

        monkeypatch.setattr(recorder_module, "may_hold_secret", choke)
        with psycopg.connect(lg.dsn(), autocommit=True) as c:
            assert run(c) is None
            run(c, "SELECT 'choke'")  # judged before the failure was known: it may run
            refusal = run(c, "SELECT 2")
            assert refusal is not None and refusal[0] == "58030" and "the recorder failed on decided" in refusal[1]
    finally:
        lg.stop()

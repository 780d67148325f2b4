"""The writer process (record_writer = process): a child of the gateway writes the
recordings. A child killed or stopped is a recording failure like a disk error (statements are
refused under record_failure = block, the message says why); a killed one is replaced after a
second, the new one closes the file the dead one left open and writes a gap record, and the
chain still verifies. A gateway that stops, however it stops, leaves everything written."""

from __future__ import annotations

import os
import signal
import time

import psycopg

from pooler.recording.files import list_files
from pooler.recording.reader import iter_events
from pooler.recording.verify import verify
from tests.test_admin_console import console, show
from tests.test_metrics import scrape, value
from tests.test_recordings_failure import run, start, until


def writer_pid(g) -> int:
    """The gateway's child process (the writer)."""
    def find():
        kids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == g.proc.pid:
                            kids.append(int(name))
                except (OSError, IndexError):
                    pass
        return kids
    (pid,) = until(find, "the writer process")
    return pid


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_killed_writer_process_blocks_statements_until_a_new_one_takes_over(gw_factory, tmp_path):
    d = tmp_path / "rec"
    g, mport = start(gw_factory, tmp_path, d, "block", record_writer="process")
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        assert run(c, "SELECT 'before the kill'") is None
        first = writer_pid(g)
        until(lambda: "SELECT 'before the kill'" in [e.get("sql") for e in iter_events(d)], "written")
        os.kill(first, signal.SIGKILL)
        refusal = until(lambda: run(c, "SELECT 2"), "a statement refused")
        assert refusal[0] == "58030"
        assert "session recordings cannot be written (record_failure = block)" in refusal[1]
        assert "the recording writer process died (killed by signal 9)" in refusal[1]
        assert value(scrape(mport), "pooler_recording_blocked") == 1
        until(lambda: run(c, "SELECT 'after the kill'") is None, "statements accepted again")  # a second later
        assert writer_pid(g) != first
        with console(g) as adm:
            (row,) = show(adm, "RECORDINGS")
            assert row["blocked"] == "no" and row["failing"] == ""
        assert value(scrape(mport), "pooler_recording_blocked") == 0
    g.wait_log("the recording writer process died (killed by signal 9)")
    g.wait_log("took over")
    g.stop()
    rep = verify(d)
    assert rep.ok, rep.problems
    recs = list(iter_events(d, housekeeping=True))
    sqls = [e["sql"] for e in recs if e["t"] == "stmt"]
    assert "SELECT 'before the kill'" in sqls and "SELECT 'after the kill'" in sqls
    assert any(e["t"] == "close" and e["reason"] == "recovered" for e in recs)  # the dead one's file, closed
    assert [e["t"] for e in recs][-1] == "close" and recs[-1]["reason"] == "shutdown"


def test_a_killed_writer_process_under_continue_lets_statements_run(gw_factory, tmp_path):
    d = tmp_path / "rec"
    g, mport = start(gw_factory, tmp_path, d, "continue", record_writer="process")
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        assert run(c) is None
        os.kill(writer_pid(g), signal.SIGKILL)
        for _ in range(20):
            assert run(c, "SELECT 'meanwhile'") is None
            time.sleep(0.02)
        g.wait_log("the recording writer process died")
        g.wait_log("took over")
        assert run(c, "SELECT 'recorded again'") is None
        assert value(scrape(mport), "pooler_recording_blocked") == 0
    g.stop()
    assert verify(d).ok
    assert "SELECT 'recorded again'" in [e["sql"] for e in iter_events(d) if e["t"] == "stmt"]


def test_a_stopped_writer_process_blocks_statements_until_it_runs_again(gw_factory, tmp_path):
    """SIGSTOP: the child is there but says nothing; after 5 s that is a failure."""
    d = tmp_path / "rec"
    g, mport = start(gw_factory, tmp_path, d, "block", record_writer="process")
    pid = writer_pid(g)
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        assert run(c) is None
        os.kill(pid, signal.SIGSTOP)
        try:
            refusal = until(lambda: run(c, "SELECT 2"), "a statement refused", timeout=20)
            assert refusal[0] == "58030" and "does not answer" in refusal[1]
        finally:
            os.kill(pid, signal.SIGCONT)
        until(lambda: run(c, "SELECT 'awake'") is None, "statements accepted again")
        assert writer_pid(g) == pid  # the same process, nothing lost
    g.stop()
    rep = verify(d)
    assert rep.ok, rep.problems
    recs = list(iter_events(d, housekeeping=True))
    assert "SELECT 'awake'" in [e["sql"] for e in recs if e["t"] == "stmt"]
    assert not [e for e in recs if e["t"] == "gap"]


def test_a_clean_stop_writes_everything(gw_factory, tmp_path):
    d = tmp_path / "rec"
    g, _ = start(gw_factory, tmp_path, d, "block", record_fsync="1s", record_writer="process")
    pid = writer_pid(g)
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        for k in range(300):
            assert run(c, f"SELECT {k}") is None
        assert run(c, "SELECT 'the last one'") is None
    g.stop()  # at once: the last records are still in the gateway's buffer
    assert gone(pid)
    rep = verify(d)
    assert rep.ok, rep.problems
    files = list_files(d)
    assert files and not any(f.is_open for f in files)  # the last file closed and compressed
    recs = list(iter_events(d, housekeeping=True))
    sqls = [e["sql"] for e in recs if e["t"] == "stmt"]
    assert sqls[-1] == "SELECT 'the last one'" and len(sqls) == 301
    assert recs[-1]["t"] == "close" and recs[-1]["reason"] == "shutdown"
    assert any(e["t"] == "logout" for e in recs)


def test_a_killed_gateway_leaves_its_records_written(gw_factory, tmp_path):
    """SIGKILL to the gateway: the writer process sees its pipe end, writes what it was handed
    and closes the file; only what the gateway had not handed over (at most 100 ms) is gone."""
    d = tmp_path / "rec"
    g, _ = start(gw_factory, tmp_path, d, "block", record_writer="process")
    pid = writer_pid(g)
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        assert run(c, "SELECT 'handed over'") is None
        time.sleep(0.5)  # a tick or more: handed to the writer process
        g.proc.kill()
        g.proc.wait()
    until(lambda: gone(pid), "the writer process exited")
    rep = verify(d)
    assert rep.ok, rep.problems
    recs = list(iter_events(d, housekeeping=True))
    assert "SELECT 'handed over'" in [e["sql"] for e in recs if e["t"] == "stmt"]
    assert recs[-1]["t"] == "close" and recs[-1]["reason"] == "shutdown"


def _chunk(k: int, n: int = 1000) -> bytearray:
    from pooler.recording.format import encode

    buf = bytearray()
    for j in range(n):
        buf += encode({"t": "x", "ts": 1.0, "k": k, "j": j, "pad": "p" * 60}) + b"\n"
    return buf


def test_writer_process_queues_what_the_pipe_does_not_take_and_counts_drops(tmp_path):
    """The gateway's side alone (no gateway): the child stopped, chunks wait in the gateway up to
    max_queued records; beyond, they are dropped and counted; once the child runs again every
    chunk accepted is written, after a gap record counting the drops."""
    from pooler.recording.process import WriterProcess

    d = tmp_path / "rec"
    w = WriterProcess(d, gateway="t", compression="none", fsync=1.0, max_queued=5000)
    w.start()
    try:
        os.kill(w.pid, signal.SIGSTOP)
        for k in range(5):
            w.submit(_chunk(k), 1000)  # never blocks, pipe full or not
        assert w.queued == 5000 and w.lost == 0
        w.submit(_chunk(5), 1000)
        assert w.lost == 1000 and w.queued == 5000
        assert "fell behind" in w.behind()
        os.kill(w.pid, signal.SIGCONT)
        until(lambda: (w.poll(), w.queued == 0)[1], "written")
        w.submit(_chunk(6), 1000)
        until(lambda: (w.poll(), w.queued == 0)[1], "written")
        assert w.failing is None and w.behind() is None and w.lost == 1000
    finally:
        w.stop()
    assert verify(d).ok
    recs = list(iter_events(d, housekeeping=True))
    assert sorted({e["k"] for e in recs if e["t"] == "x"}) == [0, 1, 2, 3, 4, 6]
    (gap,) = [e for e in recs if e["t"] == "gap"]
    assert gap["lost"] == 1000 and gap["reason"] == "the writer fell behind"
    order = [e["t"] if e["t"] == "gap" else e["k"] for e in recs if e["t"] == "gap" or e.get("j") == 0]
    assert order.index("gap") < order.index(6)  # (with the chunks taken with it: as Writer's own drops)


def test_a_writer_process_that_cannot_be_started_leaves_no_pipe_open(tmp_path, monkeypatch):
    """Popen failing (no interpreter at that path) raises OSError from start, as a record_dir
    that cannot be used does, and closes both pipes: a gateway that retries every second for
    hours must not run out of file descriptors."""
    import pytest

    from pooler.recording import process

    monkeypatch.setattr(process.sys, "executable", str(tmp_path / "no-such-python"))
    w = process.WriterProcess(tmp_path / "rec", gateway="test")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(OSError):
            w._spawn(create=True)
    assert len(os.listdir("/proc/self/fd")) == before

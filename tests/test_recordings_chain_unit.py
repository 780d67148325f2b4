"""The recording files without a gateway: the writer thread's files, rotation and retention
decisions, and verify catching each kind of tampering (changed, removed, inserted record; cut
tail; deleted middle file; records removed at a file's end; wrong or missing HMAC key)."""

from __future__ import annotations

import gzip
import os
import time

import orjson
import pytest

from pooler.recording import files as rf
from pooler.recording.format import encode
from pooler.sql.secrets import redact
from pooler.recording.reader import iter_events, iter_sessions
from pooler.recording.verify import verify
from pooler.recording.writer import Writer


def write(d, n_sessions=6, per=20, key=None, rotate_size=4096, compression="gzip", stop=True, **kw):
    """Sessions of ``per`` records each, through a real Writer; -> the writer."""
    w = Writer(d, gateway="test", rotate_size=rotate_size, rotate_age=0, compression=compression, fsync=0.0,
               key=key, **kw)
    w.start()
    for s in range(n_sessions):
        chunk = [encode({"t": "login", "ts": time.time(), "sid": f"t.{s}", "i": 0, "user": f"agent{s}",
                         "database": "shop", "groups": ["agents"]})]
        chunk += [encode({"t": "stmt", "ts": time.time(), "sid": f"t.{s}", "i": i, "q": i, "sql": f"SELECT {i}"})
                  for i in range(1, per - 1)]
        chunk.append(encode({"t": "logout", "ts": time.time(), "sid": f"t.{s}", "i": per - 1, "reason": "bye"}))
        w.submit(chunk)
        _wait(lambda: w.queued == 0)
    if stop:
        w.stop()
    return w


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "writer did not catch up"
        time.sleep(0.005)


def lines_of(path):
    return rf.read_lines(path)[0]


def rewrite(path, lines):
    data = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("compression, suffix", [("gzip", ".gz"), ("zstd", ".zst")])
def test_rotated_files_chain_and_read_back(tmp_path, compression, suffix):
    write(tmp_path, n_sessions=6, per=20, compression=compression)
    files = rf.list_files(tmp_path)
    assert len(files) >= 3 and all(f.compressed == suffix for f in files)
    assert [f.seq for f in files] == list(range(1, len(files) + 1))
    rep = verify(tmp_path)
    assert rep.ok, rep.problems
    assert rep.records == sum(len(lines_of(f.path)) for f in files)
    sessions = list(iter_sessions(tmp_path))
    assert [s["sid"] for s in sessions] == [f"t.{i}" for i in range(6)]
    assert all([e["i"] for e in s["events"]] == list(range(20)) for s in sessions)
    assert [s["sid"] for s in iter_sessions(tmp_path, identity="agent3")] == ["t.3"]
    assert list(iter_sessions(tmp_path, group="admins")) == []
    assert len(list(iter_events(tmp_path))) == 120  # file/close records only with housekeeping=True
    assert {e["t"] for e in iter_events(tmp_path, housekeeping=True)} == {"file", "close", "login", "stmt", "logout"}


def test_a_restarted_writer_continues_the_chain(tmp_path):
    write(tmp_path, n_sessions=2)
    write(tmp_path, n_sessions=2)
    assert verify(tmp_path).ok


def test_a_file_left_open_by_a_crash_is_closed_at_the_next_start(tmp_path):
    w = write(tmp_path, n_sessions=1, per=5, stop=False)
    os.close(w._fd)  # the process died: no close record, half a record at the end
    with open(w._path, "ab") as f:
        f.write(b'{"t":"stmt","sid":"t.0","i":5,"sql":"SELE')
    w2 = write(tmp_path, n_sessions=1, per=5)
    rep = verify(tmp_path)
    assert rep.ok, rep.problems
    assert any("stopped without closing" in n and "cut-off record removed" in n for n in rep.notes)
    assert w2.records > 0


def test_a_damaged_record_in_a_file_left_open_is_kept_for_verify_not_cut(tmp_path):
    w = write(tmp_path, n_sessions=1, per=8, stop=False, compression="none")
    os.close(w._fd)
    lines = lines_of(w._path)
    lines[3] = b"damaged"  # a record someone broke, then the crash left half a record at the end
    w._path.write_bytes(b"".join(line + b"\n" for line in lines) + b'{"t":"stmt","sid":"t.0","i":8,"sq')
    write(tmp_path, n_sessions=1, per=5, compression="none")
    kept = lines_of(rf.list_files(tmp_path)[0].path)
    assert kept[3] == b"damaged" and len(kept) == len(lines) + 1  # the records after it stay; a close is added
    rep = verify(tmp_path)
    assert not rep.ok and len(rep.problems) == 1 and ":4:" in rep.problems[0], rep.problems


def _tamper_setup(tmp_path, **kw):
    write(tmp_path, n_sessions=6, per=20, **kw)
    files = rf.list_files(tmp_path)
    assert verify(tmp_path, kw.get("key")).ok
    return files


def test_verify_catches_a_changed_record(tmp_path):
    files = _tamper_setup(tmp_path)
    lines = lines_of(files[1].path)
    lines[3] = lines[3].replace(b"SELECT", b"DELETE")
    rewrite(files[1].path, lines)
    rep = verify(tmp_path)
    assert not rep.ok
    assert rep.problems[0].startswith(f"{files[1].path.parent.name}/{files[1].path.name}:4: hash does not match")


def test_verify_catches_a_removed_record(tmp_path):
    files = _tamper_setup(tmp_path)
    lines = lines_of(files[1].path)
    del lines[5]
    rewrite(files[1].path, lines)
    rep = verify(tmp_path)
    assert any(f"{files[1].path.name}:6: hash does not match" in p for p in rep.problems)


def test_verify_catches_an_inserted_record(tmp_path):
    files = _tamper_setup(tmp_path)
    lines = lines_of(files[0].path)
    forged = orjson.loads(lines[2])
    forged["sql"] = "SELECT harmless"
    lines.insert(3, orjson.dumps(forged))
    rewrite(files[0].path, lines)
    rep = verify(tmp_path)
    assert any(f"{files[0].path.name}:4:" in p for p in rep.problems)


def test_verify_catches_a_truncated_tail(tmp_path):
    files = _tamper_setup(tmp_path, compression="none")
    last = files[-1].path
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 30])  # into the middle of the last record
    rep = verify(tmp_path)
    assert any("truncated tail" in p and last.name in p for p in rep.problems)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_verify_catches_a_cut_compressed_file(tmp_path, compression):
    files = _tamper_setup(tmp_path, compression=compression)
    p = files[1].path
    p.write_bytes(p.read_bytes()[:-40])
    rep = verify(tmp_path)
    assert any(p.name in x and "truncated tail" in x for x in rep.problems)


def test_verify_catches_records_removed_at_the_end_of_a_file(tmp_path):
    files = _tamper_setup(tmp_path)
    lines = lines_of(files[1].path)
    rewrite(files[1].path, lines[:-3])  # its close record and two before it
    rep = verify(tmp_path)
    assert any(files[1].path.name in p and "without its close record" in p for p in rep.problems)
    assert any(files[2].path.name in p and "chain broken between files" in p for p in rep.problems)


def test_verify_catches_a_deleted_middle_file(tmp_path):
    files = _tamper_setup(tmp_path)
    os.unlink(files[1].path)
    rep = verify(tmp_path)
    assert any(p.startswith(f"file(s) {files[1].seq} missing between") for p in rep.problems)


def test_hmac_chain_needs_its_key(tmp_path):
    _tamper_setup(tmp_path, key=b"secret-key")
    assert verify(tmp_path, b"secret-key").ok
    assert len(rf.list_files(tmp_path)) > 1
    # the only problem is the key: files the verifier cannot check are not "truncated" or "broken"
    (missing,) = verify(tmp_path).problems
    assert "give it with --key-file" in missing
    (other,) = verify(tmp_path, b"other").problems
    assert "another key" in other


def test_without_the_key_a_forger_cannot_rechain(tmp_path):
    """Someone who rewrites a record and recomputes the plain SHA-256 chain after it is caught
    when the files were chained with an HMAC key."""
    from pooler.recording.format import link, seal, unseal

    files = _tamper_setup(tmp_path, key=b"k1")
    lines = lines_of(files[0].path)
    prev = unseal(lines[0])[1]
    out = [lines[0]]
    for line in lines[1:]:
        body, _ = unseal(line)
        body = body.replace(b"SELECT 3", b"SELECT 4")
        h = link(prev, body, None)  # the forger has no key
        out.append(seal(body, h)[:-1])
        prev = h
    rewrite(files[0].path, out)
    assert not verify(tmp_path, b"k1").ok


def test_retention_removes_oldest_and_verify_accepts_it(tmp_path):
    write(tmp_path, n_sessions=12, per=20, retention_size=12_000)
    files = rf.list_files(tmp_path)
    assert files[0].seq > 1  # the oldest went
    assert sum(f.size for f in files) <= 12_000 + 4096
    rep = verify(tmp_path)
    assert rep.ok, rep.problems
    assert any("older files were removed" in n for n in rep.notes)
    assert any(e["t"] == "retention" for e in iter_events(tmp_path, housekeeping=True))


def test_rotation_and_retention_decisions():
    t = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    assert rf.rotate_due(100, t, t + 1, 100, 0)
    assert not rf.rotate_due(99, t, t + 1, 100, 0)
    assert rf.rotate_due(1, t, t + 3600, 0, 3600)
    assert rf.rotate_due(1, t, t + 16 * 3600, 0, 0)  # the UTC day changed
    mk = lambda seq, size, age_days: rf.RecFile(rf.Path(f"/r/{seq}"), seq, "", ".gz", size, t - age_days * 86400)
    fs = [mk(1, 100, 10), mk(2, 100, 5), mk(3, 100, 1), mk(4, 100, 0)]
    assert [f.seq for f in rf.retention(fs, t, 7, 0, None)] == [1]
    assert [f.seq for f in rf.retention(fs, t, 0, 250, None)] == [1, 2]
    assert [f.seq for f in rf.retention(fs, t, 0, 50, fs[3].path)] == [1, 2, 3]  # never the open file
    assert [f.seq for f in rf.retention(fs, t, 3, 150, None)] == [1, 2, 3]  # days, then the size cap


def test_retention_of_many_files_is_linear():
    """Thousands of files (a small record_rotate_size kept for months): the decision stays a
    matter of milliseconds (membership in a list made it quadratic: two minutes at 20,000 files)."""
    t = 1_800_000_000.0
    n = 20_000
    fs = [rf.RecFile(rf.Path(f"/r/{seq}"), seq, "", ".gz", 100, t - (n - seq) * 60) for seq in range(1, n + 1)]
    started = time.perf_counter()
    gone = rf.retention(fs, t, 7, 100 * (n // 2), fs[-1].path)
    assert time.perf_counter() - started < 1.0
    assert [f.seq for f in gone] == list(range(1, n // 2 + 1))  # the oldest half: days took 10,000 - 7 days' worth


@pytest.mark.parametrize("sql, shown", [
    ("ALTER ROLE bob PASSWORD 'hunter2'", "ALTER ROLE bob PASSWORD '********'"),
    ("create user x with password 'it''s' valid until 'infinity'", "create user x with password '********' valid until 'infinity'"),
    ("ALTER ROLE bob PASSWORD $pw$ s3cr3t $pw$", "ALTER ROLE bob PASSWORD '********'"),
    ("SELECT dblink_connect('host=db password=hunter2 user=x')", "SELECT dblink_connect('host=db password=******** user=x')"),
    ("ALTER ROLE bob PASSWORD U&'hunter2'", "ALTER ROLE bob PASSWORD '********'"),
    ("ALTER ROLE bob PASSWORD /**/ 'hunter2'", "ALTER ROLE bob PASSWORD /**/ '********'"),
    ("CREATE USER MAPPING FOR a SERVER s OPTIONS (user 'a', \"password\" 'hunter2')",
     "CREATE USER MAPPING FOR a SERVER s OPTIONS (user 'a', \"password\" '********')"),
    ("CREATE SUBSCRIPTION s CONNECTION 'postgresql://u:hunter2@h/db' PUBLICATION p",
     "CREATE SUBSCRIPTION s CONNECTION '********' PUBLICATION p"),
    ("SELECT dblink_connect('postgresql://u:hunter2@h/db')", "SELECT dblink_connect('postgresql://u:********@h/db')"),
    ("SELECT 1 /* password hunter2 */", "SELECT 1 /* ******** */"),
    ("ALTER ROLE bob PASSWORD 'hunter2", "[not recorded: the statement mentions a password and could not be read]"),
])
def test_password_literals_never_reach_a_record(sql, shown):
    assert redact(sql) == (shown, True)
    assert redact("SELECT 1") == ("SELECT 1", False)


def test_the_writer_knows_its_file_size_exactly(tmp_path):
    """A failed write is cut back to the size the writer counted: it must be the file's."""
    w = write(tmp_path, n_sessions=2, per=7, rotate_size=1 << 20, stop=False)
    assert os.path.getsize(w.current_file) == w._size
    w.stop()


def test_pooler_recordings_verify_command(tmp_path):
    import subprocess
    import sys

    from tests.gwproc import REPO

    key = tmp_path / "key"
    key.write_bytes(b"k-7\n")
    d = tmp_path / "rec"
    write(d, n_sessions=4, per=20, key=b"k-7")

    def verify_cmd(*args):
        return subprocess.run([sys.executable, "-m", "pooler", "recordings", "verify", str(d), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=60)

    ok = verify_cmd("--key-file", str(key))
    assert ok.returncode == 0 and "the chain holds" in ok.stdout, ok.stdout + ok.stderr
    no_key = verify_cmd()
    assert no_key.returncode == 1 and "--key-file" in no_key.stdout
    files = rf.list_files(d)
    lines = lines_of(files[1].path)
    lines[2] = lines[2].replace(b"SELECT", b"select")
    rewrite(files[1].path, lines)
    unset = verify_cmd("--key-env", "REC_KEY_T")
    assert unset.returncode == 1 and "environment variable REC_KEY_T is not set" in unset.stderr
    bad = subprocess.run([sys.executable, "-m", "pooler", "recordings", "verify", str(d), "--key-env", "REC_KEY_T",
                          "--json"], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "REC_KEY_T": "k-7"})
    rep = orjson.loads(bad.stdout)
    assert bad.returncode == 1 and not rep["ok"]
    assert rep["problems"][0].endswith(f"{files[1].path.name}:3: hash does not match: this record was changed, "
                                       "or one was removed or inserted before it")


def test_a_writer_thread_that_dies_or_falls_behind_is_reported_so_block_can_block(tmp_path, monkeypatch):
    w = Writer(tmp_path / "a", gateway="test", rotate_size=1 << 20, rotate_age=0, compression="gzip", fsync=0.0)
    w.start()
    assert w.behind() is None

    def broken(lines):
        raise RuntimeError("a bug in the writer")
    monkeypatch.setattr(w, "_write", broken)
    w.submit([encode({"t": "stmt", "ts": time.time(), "sid": "t.1", "i": 1, "q": 1, "sql": "SELECT 1"})])
    w._thread.join(10)
    assert not w._thread.is_alive()
    assert "RuntimeError: a bug in the writer" in w.behind()
    w.stop()

    slow = Writer(tmp_path / "b", gateway="test", rotate_size=1 << 20, rotate_age=0, compression="gzip",
                  fsync=0.0, max_queued=3)  # never started: nothing takes the records
    slow.submit([encode({"t": "stmt", "ts": time.time(), "sid": "t.2", "i": i, "q": i, "sql": "SELECT 1"})
                 for i in range(5)])
    assert slow.lost == 5
    assert "fell behind" in slow.behind()


def test_a_hand_over_that_fails_blocks_statements_under_block(tmp_path):
    import asyncio
    from types import SimpleNamespace

    from pooler.config import load
    from pooler.gateway.recorder import Recorder

    ini = tmp_path / "gateway.ini"
    ini.write_text(f"[databases]\n[gateway]\nlisten_addr = 127.0.0.1\nrecord_dir = {tmp_path / 'rec'}\n"
                   "record_failure = block\nauth_type = trust\n")
    cfg = load(ini)
    gw = SimpleNamespace(config=cfg, record_block=None)

    async def main():
        r = Recorder(gw)
        r.start()
        try:
            def broken(*args):
                raise RuntimeError("a bug in the hand-over")
            r.writer.submit = broken
            r.buf += b'{"t":"stmt"}\n'
            r.nbuf = 1
            r._tick()  # the loop's 100 ms tick: the failure must not pass in silence
            return gw.record_block
        finally:
            r.writer.submit = lambda *a: None
            r.stop()
    blocked = asyncio.run(main())
    assert blocked is not None and "RuntimeError" in blocked


def test_records_lost_while_record_dir_is_gone_are_counted_each_and_told_in_one_gap_record(tmp_path):
    root = tmp_path / "rec"
    root.mkdir()
    w = Writer(root, gateway="test", rotate_size=1 << 20, rotate_age=0, compression="none", fsync=0.0)  # no thread

    def chunk(first, n):
        return b"".join(encode({"t": "stmt", "ts": time.time(), "sid": "t.1", "i": i, "q": i, "sql": "SELECT 1"})
                        + b"\n" for i in range(first, first + n))
    w._write(chunk(0, 1))
    w._close("test")
    root.rename(tmp_path / "elsewhere")
    w._write(chunk(1, 2))  # record_dir is gone: these two are lost ...
    w._write(chunk(3, 3))  # ... and these three, while a gap record waits to be written
    assert w.lost == 5 and w.failing
    (tmp_path / "elsewhere").rename(root)
    w._write(chunk(6, 1))
    assert w.failing is None
    w._close("test")
    recs = [orjson.loads(line) for f in rf.list_files(root) for line in rf.read_lines(f.path)[0]]
    gaps = [r for r in recs if r["t"] == "gap"]
    assert [g["lost"] for g in gaps] == [5]
    assert [r["i"] for r in recs if r["t"] == "stmt"] == [0, 6]
    assert verify(root).ok

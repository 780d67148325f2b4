"""Reading recordings by time (recording/reader.py) and following one (recording/follow.py) on
files laid out as the writer lays them out: only the files that may hold the range are read,
sessions found there still come whole, and a follow goes on from where it stopped."""

from __future__ import annotations

import orjson

from pooler.recording import files as rf
from pooler.recording import follow as fo
from pooler.recording import reader as rd
from pooler.recording.files import compress, day_of, file_name
from pooler.recording.follow import Tail, follow_session
from pooler.recording.reader import iter_events, iter_sessions

T0 = 1_796_000_000.0  # 2026-11-30T...Z
H = 3600.0


def rec(t, ts, sid=None, i=0, **kw):
    r = {"t": t, "ts": ts}
    if sid is not None:
        r.update(sid=sid, i=i)
    r.update(kw)
    return orjson.dumps(r) + b"\n"


def lay_out(root, files):
    """``files``: [(seq, opened, run, [records...], closed)] -> their paths, by seq."""
    paths = {}
    for seq, opened, run, recs, closed in files:
        day = root / day_of(opened)
        day.mkdir(exist_ok=True)
        p = day / file_name(seq, opened)
        p.write_bytes(rec("file", opened, seq=seq, gateway=run) + b"".join(recs)
                      + (rec("close", opened + 1, records=len(recs)) if closed else b""))
        paths[seq] = compress(p, "gzip") if closed else p
    return paths


def reads(monkeypatch, module):
    """The paths ``module.read_lines`` is asked for, in order."""
    seen = []
    real = rf.read_lines

    def spy(path):
        seen.append(path)
        return real(path)
    monkeypatch.setattr(module, "read_lines", spy)
    return seen


def _hours(tmp_path):
    # A: all in file 1; B: logs in in file 1, runs through file 2, logs out in file 3; C: file 2;
    # D: file 3; E: file 4, a day later
    return lay_out(tmp_path, [
        (1, T0, "r1", [rec("login", T0 + 1, "r1.1", 0, user="a"), rec("logout", T0 + 10, "r1.1", 1),
                       rec("login", T0 + 20, "r1.2", 0, user="b"), rec("stmt", T0 + 30, "r1.2", 1, q=1)], True),
        (2, T0 + H, "r1", [rec("stmt", T0 + H + 50, "r1.2", 2, q=2), rec("login", T0 + H + 100, "r1.3", 0, user="c"),
                           rec("logout", T0 + H + 110, "r1.3", 1)], True),
        (3, T0 + 2 * H, "r1", [rec("logout", T0 + 2 * H + 100, "r1.2", 3), rec("login", T0 + 2 * H + 200, "r1.4", 0),
                               rec("logout", T0 + 2 * H + 210, "r1.4", 1)], True),
        (4, T0 + 26 * H, "r1", [rec("login", T0 + 26 * H + 5, "r1.5", 0), rec("logout", T0 + 26 * H + 6, "r1.5", 1)],
         False),
    ])


def test_sessions_of_a_range_read_only_the_files_they_are_in(tmp_path, monkeypatch):
    paths = _hours(tmp_path)
    whole = {s["sid"]: s for s in iter_sessions(tmp_path)}
    seen = reads(monkeypatch, rd)
    got = list(iter_sessions(tmp_path, since=T0 + H + 60, until=T0 + H + 200))
    assert [s["sid"] for s in got] == ["r1.2", "r1.3"]  # A ended before, D began after
    assert got[0] == whole["r1.2"]  # whole: its login (file 1) and its logout (file 3) too
    assert got[0]["login"]["user"] == "b" and [e["i"] for e in got[0]["events"]] == [0, 1, 2, 3]
    assert seen == [paths[2], paths[1], paths[3]]  # the range's file, then back and forth as far as B goes
    # an identity filter sees B's login although it is in a file before the range
    assert [s["sid"] for s in iter_sessions(tmp_path, since=T0 + H + 60, until=T0 + H + 200, identity="b")] == ["r1.2"]

    seen.clear()
    assert [s["sid"] for s in iter_sessions(tmp_path, since=T0 + 25 * H)] == ["r1.5"]
    # file 3 may hold records up to when file 4 was opened; B's login is not looked for in files
    # 1 and 2: B ended (file 3) before the range began
    assert seen == [paths[3], paths[4]]


def test_events_of_a_range_skip_files_before_and_after_it(tmp_path, monkeypatch):
    paths = _hours(tmp_path)
    seen = reads(monkeypatch, rd)
    assert [(e["sid"], e["i"]) for e in iter_events(tmp_path, until=T0 + 100)] == [
        ("r1.1", 0), ("r1.1", 1), ("r1.2", 0), ("r1.2", 1)]
    assert seen == [paths[1]]
    seen.clear()
    assert [e["sid"] for e in iter_events(tmp_path, since=T0 + 2 * H + 150, until=T0 + 2 * H + 300)] == ["r1.4"] * 2
    assert seen == [paths[3]]


def test_a_session_that_never_logged_out_is_looked_for_only_in_its_gateway_runs_files(tmp_path, monkeypatch):
    paths = lay_out(tmp_path, [
        (1, T0, "r1", [rec("login", T0 + 1, "r1.1", 0, user="a"), rec("stmt", T0 + 2, "r1.1", 1, q=1)], False),
        (2, T0 + H, "r2", [rec("login", T0 + H + 1, "r2.1", 0), rec("logout", T0 + H + 2, "r2.1", 1)], True),
        (3, T0 + 2 * H, "r2", [rec("login", T0 + 2 * H + 1, "r2.2", 0)], False),
    ])
    seen = reads(monkeypatch, rd)
    (s,) = iter_sessions(tmp_path, until=T0 + 100)
    assert s["sid"] == "r1.1" and s["logout"] is None  # the gateway stopped without a logout record
    assert seen == [paths[1], paths[2]]  # file 2 is another run's: r1.1 cannot go on there or later


def test_following_a_session_starts_at_its_file_and_goes_on_from_where_it_stopped(tmp_path, monkeypatch):
    paths = lay_out(tmp_path, [
        (1, T0, "r1", [rec("login", T0 + 1, "r1.1", 0), rec("logout", T0 + 2, "r1.1", 1)], True),
        (2, T0 + 26 * H, "r1", [rec("login", T0 + 26 * H + 10, "r1.2", 0), rec("stmt", T0 + 26 * H + 11, "r1.2", 1)],
         True),
        (3, T0 + 27 * H, "r1", [rec("stmt", T0 + 27 * H + 1, "r1.2", 2)], False),
    ])
    seen = reads(monkeypatch, fo)
    listed = []
    real_list = fo.list_files
    monkeypatch.setattr(fo, "list_files", lambda root, from_day=None: listed.append(from_day) or real_list(root, from_day))
    tail = Tail.since(tmp_path, T0 + 26 * H + 10)
    assert tail.seq == 2
    got = tail.poll()
    assert [(r.get("sid"), r["t"]) for r in got if r.get("sid")] == [("r1.2", "login"), ("r1.2", "stmt"),
                                                                      ("r1.2", "stmt")]
    assert seen == [paths[2]]  # file 1 (the day before) is never read; file 3 is open, read as it grows
    with open(paths[3], "ab") as f:
        f.write(rec("logout", T0 + 27 * H + 2, "r1.2", 3))
    assert [r["t"] for r in tail.poll()] == ["logout"]  # only what is new
    assert seen == [paths[2]] and listed[-1] == day_of(T0 + 26 * H)  # nothing read again, the old day not listed
    assert day_of(T0) < listed[-1]

    got = list(follow_session(tmp_path, "r1.2", interval=0.01, start=T0 + 26 * H + 10))
    assert [r["i"] for r in got] == [0, 1, 2, 3]

"""Following a recording as it is written (recording/follow.py), on real files laid out as the
writer lays them out: only whole lines, nothing lost or repeated when a file is closed,
compressed and the next one opened."""

from __future__ import annotations

import orjson

from pooler.recording.files import compress, file_name
from pooler.recording.follow import Tail, follow_session

T0 = 1_796_000_000.0


def line(i, t="stmt", sid="r.1"):
    return orjson.dumps({"t": t, "ts": T0 + i, "sid": sid, "i": i}) + b"\n"


def test_whole_lines_only_and_rotation_neither_loses_nor_repeats(tmp_path):
    day = tmp_path / "2026-12-01"
    day.mkdir()
    first = day / file_name(1, T0)
    first.write_bytes(line(0, "login") + line(1) + line(2)[:10])  # the writer is in the middle of a line
    tail = Tail(tmp_path)
    assert [r["i"] for r in tail.poll()] == [0, 1]
    assert tail.poll() == []
    with open(first, "ab") as f:
        f.write(line(2)[10:] + line(3))
    assert [r["i"] for r in tail.poll()] == [2, 3]
    with open(first, "ab") as f:  # written between two polls, then the file is closed and compressed
        f.write(line(4))
    compress(first, "gzip")
    second = day / file_name(2, T0 + 60)
    second.write_bytes(line(5) + line(6, "logout"))
    assert [r["i"] for r in tail.poll()] == [4, 5, 6]
    assert tail.poll() == []


def test_follow_session_ends_at_its_logout_and_skips_other_sessions(tmp_path):
    day = tmp_path / "2026-12-01"
    day.mkdir()
    (day / file_name(1, T0)).write_bytes(line(0, "login") + line(0, "login", sid="r.2") + line(1, sid="r.2")
                                         + line(1) + line(2, "logout") + line(3, sid="r.1"))
    got = list(follow_session(tmp_path, "r.1", interval=0.01))
    assert [(r["sid"], r["i"], r["t"]) for r in got] == [("r.1", 0, "login"), ("r.1", 1, "stmt"), ("r.1", 2, "logout")]


def test_follow_session_stops_when_asked(tmp_path):
    (tmp_path / "2026-12-01").mkdir()
    (tmp_path / "2026-12-01" / file_name(1, T0)).write_bytes(line(0, "login"))
    polls = []
    got = list(follow_session(tmp_path, "r.1", interval=0.0, stop=lambda: polls.append(1) or len(polls) >= 3))
    assert [r["t"] for r in got] == ["login"] and len(polls) == 3

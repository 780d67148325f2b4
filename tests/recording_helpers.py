"""What the recording tests share: a gateway recording to a directory of the test's own, and
waiting (with a deadline) until the records a test expects have been written."""

from __future__ import annotations

import time

from pooler.recording.reader import iter_events, iter_sessions


def recording_gw(gw_factory, tmp_path, name="rec", **settings):
    """A gateway recording to ``tmp_path/name`` (record_fsync always: a test reads at once)."""
    d = tmp_path / name
    s = {"record_dir": str(d), "record_fsync": "always"}
    s.update({k: str(v) for k, v in settings.items()})
    g = gw_factory(settings=s, databases=settings.pop("databases", None) if "databases" in settings else None)
    return g, d


def wait_sessions(d, pred, timeout: float = 15.0) -> list[dict]:
    """The sessions recorded under ``d`` once ``pred(sessions)`` holds (polls the files)."""
    deadline = time.monotonic() + timeout
    last: list[dict] = []
    while time.monotonic() < deadline:
        last = list(iter_sessions(d))
        if pred(last):
            return last
        time.sleep(0.05)
    raise AssertionError(f"recordings never matched; last seen: {[[e['t'] for e in s['events']] for s in last][:5]}")


def wait_logged_out(d, n: int = 1, timeout: float = 15.0) -> list[dict]:
    """Wait until ``n`` sessions have their logout record; -> those sessions, in start order."""
    got = wait_sessions(d, lambda ss: sum(1 for s in ss if s["logout"] is not None) >= n, timeout)
    return [s for s in got if s["logout"] is not None]


def events(d, **kw) -> list[dict]:
    return list(iter_events(d, **kw))


def of(session: dict, t: str) -> list[dict]:
    return [e for e in session["events"] if e["t"] == t]

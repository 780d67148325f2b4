"""Many sessions at once, and a stream of sessions over rotating files: every session's records
arrive whole and in order (``i`` 0, 1, 2, ... without a gap or a repeat, ``q`` in order), files
rotate and retention removes the oldest, and the chain verifies across all of it, restarts
included."""

from __future__ import annotations

import asyncio

import asyncpg

from pooler.recording import files as rf
from pooler.recording.reader import iter_sessions
from pooler.recording.verify import verify
from tests.recording_helpers import recording_gw, wait_logged_out

N = 100
STATEMENTS = 5


async def one_session(g, k: int) -> None:
    c = await asyncpg.connect(host=g.host, port=g.port, user="postgres", database="postgres", ssl=False,
                              server_settings={"application_name": f"s{k}"})
    try:
        for j in range(STATEMENTS):
            assert await c.execute(f"SELECT {k * 100 + j}") == "SELECT 1"  # a simple Query
    finally:
        await c.close()


async def all_sessions(g) -> None:
    await asyncio.gather(*(one_session(g, k) for k in range(N)))


def test_100_concurrent_sessions_are_recorded_without_a_lost_or_interleaved_record(gw_factory, tmp_path):
    g, d = recording_gw(gw_factory, tmp_path, pool_mode="transaction", default_pool_size=10, record_fsync="1s")
    asyncio.run(all_sessions(g))
    sessions = wait_logged_out(d, N)
    assert len(sessions) == N
    by_app = {s["login"]["app"]: s for s in sessions}
    assert set(by_app) == {f"s{k}" for k in range(N)}
    for k in range(N):
        s = by_app[f"s{k}"]
        ev = s["events"]
        assert [e["i"] for e in ev] == list(range(len(ev))), f"session s{k}: records lost or repeated"
        assert ev[0]["t"] == "login" and ev[-1]["t"] == "logout"
        sql = [e["sql"] for e in ev if e["t"] == "stmt"]
        assert sql == [f"SELECT {k * 100 + j}" for j in range(STATEMENTS)], f"session s{k}: statements not its own"
        rows = [r["rows"] for r in ev if r["t"] == "rows"]
        assert rows == [[[str(k * 100 + j)]] for j in range(STATEMENTS)]
        done = [e for e in ev if e["t"] == "done"]
        assert len(done) == STATEMENTS and all(e["q"] == j + 1 for j, e in enumerate(done))
    g.stop()
    assert verify(d).ok


def test_rotation_and_retention_under_a_stream_of_sessions(gw_factory, tmp_path):
    g, d = recording_gw(gw_factory, tmp_path, record_rotate_size="4kB", record_retention_size="40kB",
                        record_fsync="rotate")

    async def stream():
        for k in range(60):
            await one_session(g, k)

    asyncio.run(stream())
    wait_logged_out(d, 1)
    g.stop()
    files = rf.list_files(d)
    assert files[0].seq > 1, "retention removed nothing"
    assert len(files) > 3 and all(not f.is_open for f in files)
    assert sum(f.size for f in files) <= 40 * 1024 + 4096
    rep = verify(d)
    assert rep.ok, rep.problems
    sessions = [s for s in iter_sessions(d) if s["logout"] is not None and s["login"] is not None]
    assert sessions and sessions[-1]["login"]["app"] == "s59"  # the newest kept, the oldest gone
    # a second gateway on the same directory continues the chain and the numbering
    g2, _ = recording_gw(gw_factory, tmp_path, record_rotate_size="4kB")
    asyncio.run(one_session(g2, 99))
    wait_logged_out(d, len(sessions) + 1)
    g2.stop()
    after = rf.list_files(d)
    assert after[-1].seq > files[-1].seq
    assert verify(d).ok

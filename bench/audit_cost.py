"""What the audit stream costs the event loop, per event, and how fast its file writer drains.

The loop's share is what matters (the writer threads run beside it): for an allowed statement
the ``decided`` event with and without the audit observer subscribed (allowed statements are
not audited: the difference is one Python call and a test); for a denial (``decided`` + the
``refused`` that follows), a mask decision and a login, the whole document built, serialized
and queued. Then the file destination's thread: events per second written to a file.
A real Gateway object (audit_file in a temporary directory), a session stand-in with the fields
the audit reads; no sockets. Best of several repeats.

    .venv/bin/python bench/audit_cost.py [--repeat 5] [--events 20000]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from pooler.audit.sinks import FileSink, Item
from pooler.config import Config
from pooler.gateway.app import Gateway
from pooler.policy.rules import Decision


class Session(SimpleNamespace):
    __hash__ = object.__hash__  # sessions are dict keys (the audit pairs a denial with its refusal)


def session():
    return Session(addr="127.0.0.1:51234", user="agent", login_name="agent", groups=("agents",),
                   database="shop", pool=SimpleNamespace(server_user="postgres", key=("shop", "postgres")), id=7,
                   app_name="nightly", tls=False, auth_method="md5", mode="transaction", console=False)


def best(fn, n: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(n)
        times.append(time.perf_counter() - t0)
    return min(times) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--no-writer", action="store_true", help="leave the writer thread stopped (the loop's work alone)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="audit-cost-"))
    (tmp / "rules").mkdir()
    (tmp / "rules" / "10.star").write_text('def on_statement(stmt, session):\n    return None\n')

    async def run() -> None:
        cfg = Config(path=tmp / "gateway.ini", auth_type="trust", rules_dir=str(tmp / "rules"),
                     audit_file=str(tmp / "audit.jsonl"), audit_queue_size=10 ** 7)
        gw = Gateway(cfg)
        for o in list(gw.events.observers):  # the audit alone (and the decisions' counter, as in a gateway with rules)
            if o is not gw.audit and o is not gw.decisions:
                gw.events.unsubscribe(o)
        if not a.no_writer:
            gw.audit.start()
        s = session()
        allow, deny = Decision("allow"), Decision("deny", "no deletes", "rules/10.star")
        masked = Decision("mask", "pii", "rules/10.star", (("public.customers.email", "email"),))
        sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 4242"

        def allowed(n):
            ev = gw.events.decided
            for _ in range(n):
                ev(s, "Q", sql, allow)

        def denied(n):
            dec, ref = gw.events.decided, gw.events.refused
            for _ in range(n):
                dec(s, "Q", "DELETE FROM customers WHERE id = 3", deny)
                ref(s, "42501", "refused by rules/10.star: no deletes")

        def mask(n):
            ev = gw.events.decided
            for _ in range(n):
                ev(s, "Q", "SELECT email FROM customers", masked)

        def login(n):
            ev = gw.events.login
            for _ in range(n):
                ev(s)

        with_audit = best(allowed, a.events * 5, a.repeat)
        rows = [("denial (decided + refused)", best(denied, a.events, a.repeat)),
                ("mask decision", best(mask, a.events, a.repeat)),
                ("login", best(login, a.events, a.repeat))]
        gw.events.unsubscribe(gw.audit)
        without = best(allowed, a.events * 5, a.repeat)
        if a.no_writer:
            gw.audit.start()
        for sink in gw.audit.sinks:
            sink.stop(60)
        print("loop-side cost per event (us, best of repeats)")
        print(f"  allowed statement, decided event without audit   {without:7.3f}")
        print(f"  allowed statement, decided event with audit      {with_audit:7.3f}   (+{with_audit - without:.3f})")
        for name, us in rows:
            print(f"  {name:<48} {us:7.2f}   (document built, serialized, queued)")

    asyncio.run(run())

    sink = FileSink(str(tmp / "writer.jsonl"), queue_size=a.events * 10)
    line = (tmp / "audit.jsonl").read_bytes().splitlines()[0]
    for _ in range(a.events * 5):
        sink.put(Item(line, 4, "statement-denied", "t"))
    t0 = time.perf_counter()
    sink.start()
    sink.stop(60)
    dt = time.perf_counter() - t0
    print(f"file writer: {a.events * 5} events of {len(line)} bytes in {dt:.3f} s = "
          f"{a.events * 5 / dt:,.0f} events/s ({dt / (a.events * 5) * 1e6:.2f} us each, off the loop)")


if __name__ == "__main__":
    main()

"""The floor of a recording design this gateway does not have: the proxy loop only copies the
bytes it reads from a ready client and writes to it (after masking), each with a 17-byte header
(session, time, direction, length), plus one such header per decision, into one buffer handed
once per loop pass to a child process; the records would be built there, from the messages.
The child here is ``cat > /dev/null``: what the gateway's side of such a design costs, not what
building the records in the child would. The recorder's per-statement events are unsubscribed
(its login, logout and rarer records still go to its writer as usual).

Not a recorder: ``bench/record_overhead.py --tap-floor`` runs it as one more target, to weigh a
redesign of the recorder before building it. Run as ``python -m bench.tap_floor run GATEWAY_INI``.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time

from pooler.gateway import session as _session
from pooler.gateway.events import Observer
from pooler.gateway.recorder import Recorder

_buf = bytearray()
_scheduled = False
_child: list[subprocess.Popen] = []
_header = struct.Struct("<IdBI").pack  # session, time, direction (0 in, 1 out, 2 decision), length


def _flush() -> None:
    global _scheduled
    _scheduled = False
    if not _child:
        _child.append(subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL))
    data = bytes(_buf)
    _buf.clear()
    os.write(_child[0].stdin.fileno(), data)  # (blocking: cat keeps up; a real design would not block)


def _tap(s, direction: int, data: bytes) -> None:
    global _scheduled
    _buf.extend(_header(id(s) & 0xFFFFFFFF, time.time(), direction, len(data)))
    _buf.extend(data)
    if not _scheduled:
        _scheduled = True
        asyncio.get_running_loop().call_soon(_flush)


_C_READY = _session.C_READY
_received = _session.ClientSession.data_received
_write = _session.ClientSession.write


def data_received(self, data: bytes) -> None:
    if self.state == _C_READY:
        _tap(self, 0, data)
    _received(self, data)


def write(self, data: bytes) -> None:
    if not self.closed:
        _tap(self, 1, data)
    _write(self, data)


def decided(self, s, kind: str, sql: str, d) -> None:  # which decision: its id (its fields once, in a design)
    _buf.extend(_header(id(s) & 0xFFFFFFFF, time.time(), 2, id(d) & 0xFFFFFFFF))


_session.ClientSession.data_received = data_received
_session.ClientSession.write = write
Recorder.decided = decided
for _name in ("bound", "row", "completed", "ready"):
    setattr(Recorder, _name, getattr(Observer, _name))  # the hub subscribes only what a class overrides

if __name__ == "__main__":
    from pooler.cli import main

    raise SystemExit(main())

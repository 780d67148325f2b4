"""Frontend (client -> server) messages after login: their type bytes and the framing check.

The frame stage of the gateway scans a client's bytes in place (type byte, length) and checks
each frame here before anything else looks at it: an unknown type, a length shorter than the
message's shortest well-formed form or longer than ``max_packet_size``, or a body on a message
that has none is a protocol violation (08P01) that closes the session, as PostgreSQL does.
"""

from __future__ import annotations

T_QUERY = ord("Q")
T_PARSE = ord("P")
T_BIND = ord("B")
T_DESCRIBE = ord("D")
T_EXECUTE = ord("E")
T_SYNC = ord("S")
T_FLUSH = ord("H")
T_CLOSE = ord("C")
T_TERMINATE = ord("X")
T_COPY_DATA = ord("d")
T_COPY_DONE = ord("c")
T_COPY_FAIL = ord("f")
T_FUNCTION = ord("F")
T_PASSWORD = ord("p")

# every message type a client may send once logged in -> its shortest well-formed length (the
# length field included)
MIN_LENGTH = {T_PARSE: 8, T_BIND: 12, T_DESCRIBE: 6, T_EXECUTE: 9, T_QUERY: 5, T_CLOSE: 6, T_FUNCTION: 14,
              T_COPY_FAIL: 5, T_FLUSH: 4, T_SYNC: 4, T_TERMINATE: 4, T_COPY_DONE: 4, T_COPY_DATA: 4}
# messages without a body: PostgreSQL fails one that has one (and then skips to Sync)
BODYLESS = frozenset((T_FLUSH, T_SYNC, T_TERMINATE, T_COPY_DONE))
# extended-protocol requests: the server's state is settled again only by the next Sync (or a
# simple Query that the server runs: it commits what they did)
NEEDS_SYNC = frozenset((T_PARSE, T_BIND, T_DESCRIBE, T_EXECUTE, T_CLOSE))
# message types that carry SQL (or refer to a statement) and pass the decide stage
GOVERNED = frozenset((T_QUERY, T_PARSE, T_FUNCTION, T_BIND, T_DESCRIBE))


def frame_error(t: int, length: int, max_packet: int) -> str | None:
    """Why a frame of type ``t`` and ``length`` (the length field's value) is malformed, or
    None when it is well formed."""
    shortest = MIN_LENGTH.get(t)
    if shortest is None:
        return f"invalid frontend message type {t}"
    if length > max_packet:
        return f"invalid message length {length} (max_packet_size is {max_packet})"
    if length < shortest or (length != 4 and t in BODYLESS):
        return f"invalid message length {length} for message type {chr(t)}"
    return None

"""TCP socket options of client and server connections, as PgBouncer sets them (tune_socket):
TCP_NODELAY always; SO_KEEPALIVE with tcp_keepalive, and TCP_KEEPIDLE / TCP_KEEPINTVL /
TCP_KEEPCNT / TCP_USER_TIMEOUT when set (0 leaves the operating system's default). Unix sockets
get none of them."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("pooler")


def tune_socket(sock, cfg) -> None:
    """Apply the tcp_* settings of ``cfg`` to ``sock`` (a TCP socket; others are left alone).
    An option the system refuses is logged, never fatal to the connection."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1, "TCP_NODELAY"),
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(cfg.tcp_keepalive), "tcp_keepalive")]
    if cfg.tcp_keepalive:
        for key, name in (("tcp_keepidle", "TCP_KEEPIDLE"), ("tcp_keepintvl", "TCP_KEEPINTVL"),
                          ("tcp_keepcnt", "TCP_KEEPCNT")):
            v = getattr(cfg, key)
            if v and hasattr(socket, name):
                opts.append((socket.IPPROTO_TCP, getattr(socket, name), v, key))
    if cfg.tcp_user_timeout and hasattr(socket, "TCP_USER_TIMEOUT"):
        opts.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, cfg.tcp_user_timeout, "tcp_user_timeout"))
    for level, opt, value, what in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError as e:
            log.warning("cannot set %s = %s on a socket: %s", what, value, e.strerror or e)

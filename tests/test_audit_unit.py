"""The audit stream's pure parts: RFC 5424 messages and their framing, syslog targets, ECS
documents (no secrets, empty values left out), the audit settings' checks; and the file
destination's behaviour on a real file (rotation, a directory that vanishes). No PostgreSQL."""

from __future__ import annotations

import time

import orjson
import pytest

from pooler import config as config_mod
from pooler.audit import ecs, syslog
from pooler.audit.sinks import FileSink, Item
from tests.audit_helpers import RFC5424


def test_an_rfc5424_message_has_every_header_field_and_the_json_as_msg():
    doc = ecs.document("login-failed", ["authentication"], ["start"], "failure", "x", severity=ecs.WARNING,
                       when=1796288000.5)
    line = ecs.dumps(doc)
    msg = syslog.message(16, ecs.WARNING, doc["@timestamp"], "gw host\u00e9", 4242, "login-failed", line)
    m = RFC5424.match(msg)
    assert m is not None
    assert m.group(1) == b"132"  # local0 (16) * 8 + warning (4)
    assert m.group(2) == b"2026-12-03T08:53:20.500Z"
    assert m.group(3) == b"gw_host_"  # printable US-ASCII only, never a space
    assert (m.group(4), m.group(5)) == (b"4242", b"login-failed")
    assert orjson.loads(m.group(6)) == doc and not m.group(6).startswith(b"\xef\xbb\xbf")  # no BOM
    assert syslog.message(16, 6, "t", "", 1, "a" * 40, b"{}").split(b" ")[2] == b"-"  # empty HOSTNAME: NILVALUE
    assert len(syslog.message(16, 6, "t", "h", 1, "a" * 40, b"{}").split(b" ")[5]) == 32  # MSGID at most 32


def test_octet_counting_frames_by_byte_length():
    msg = "<134>1 - - pooler 1 x - {\"m\":\"é\"}".encode()
    framed = syslog.octet_counted(msg)
    n, _, rest = framed.partition(b" ")
    assert int(n) == len(msg) == len(rest) and rest == msg


@pytest.mark.parametrize("target, want", [
    ("udp://127.0.0.1:514", ("udp", ("127.0.0.1", 514))),
    ("tcp://siem.example.com:6514", ("tcp", ("siem.example.com", 6514))),
    ("tcp://[::1]:601", ("tcp", ("::1", 601))),
    ("unix:/dev/log", ("unix", "/dev/log")),
])
def test_syslog_targets(target, want):
    assert syslog.parse_target(target) == want


@pytest.mark.parametrize("bad", ["syslog.example.com:514", "udp://host", "tcp://host:0", "unix:relative", "http://x:1"])
def test_bad_syslog_targets_are_config_errors_naming_the_forms(tmp_path, bad):
    ini = tmp_path / "g.ini"
    ini.write_text(f"[gateway]\nauth_type = trust\naudit_syslog = {bad}\n")
    with pytest.raises(config_mod.ConfigError, match=r"g.ini:3: invalid value for audit_syslog: (expected udp://host:port, tcp://host:port or unix:/path|port out of range)"):
        config_mod.load(ini)


def test_the_http_token_comes_from_a_file_or_the_environment_and_is_never_shown(tmp_path, monkeypatch):
    tok = tmp_path / "token"
    tok.write_text("abc-secret-123\n")
    ini = tmp_path / "g.ini"
    ini.write_text(f"[gateway]\nauth_type = trust\naudit_http_url = http://127.0.0.1:9/x\naudit_http_token_file = {tok}\n")
    cfg = config_mod.load(ini)
    assert cfg.audit_http_token == "abc-secret-123"
    assert "abc-secret-123" not in repr(config_mod.describe(cfg))
    monkeypatch.setenv("AUDIT_TOK", "from-env")
    ini.write_text("[gateway]\nauth_type = trust\naudit_http_url = http://127.0.0.1:9/x\naudit_http_token_env = AUDIT_TOK\n")
    assert config_mod.load(ini).audit_http_token == "from-env"
    ini.write_text("[gateway]\nauth_type = trust\naudit_http_url = http://127.0.0.1:9/x\naudit_http_token_env = NOPE_NOT_SET\n")
    with pytest.raises(config_mod.ConfigError, match="NOPE_NOT_SET"):
        config_mod.load(ini)
    ini.write_text(f"[gateway]\nauth_type = trust\naudit_http_token_file = {tok}\n")
    with pytest.raises(config_mod.ConfigError, match="audit_http_url is not set"):
        config_mod.load(ini)


def test_audit_settings_cannot_be_changed_with_set(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text(f"[gateway]\nauth_type = trust\naudit_file = {tmp_path / 'a.jsonl'}\n")
    cfg = config_mod.load(ini)
    for key in ("audit_file", "audit_syslog", "audit_http_url", "audit_queue_size"):
        with pytest.raises(config_mod.ConfigError, match="cannot be changed while the gateway runs"):
            config_mod.with_setting(cfg, key, "")


def test_statements_are_normalized_so_no_constant_leaves():
    text, fp = ecs.statement("ALTER ROLE agent PASSWORD 'hunter2'")
    assert "hunter2" not in text and "$1" in text and fp
    assert ecs.statement("SELECT * FROM t WHERE ssn = '123-45-6789'")[0] == "SELECT * FROM t WHERE ssn = $1"
    assert ecs.statement("SELEKT password 'x'") == (None, None)  # unparseable: no text at all
    # constants normalize leaves in utility statements, and comments, are gone too
    for sql, secret in [("CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host 'h', password 'hunter2')",
                         "hunter2"), ("ALTER ROLE bob SET app.key = 'k-123'", "k-123"),
                        ("COPY t FROM PROGRAM 'curl -H token:abc'", "abc"),
                        ("PREPARE p AS SELECT * FROM t WHERE ssn = '123-45-6789'", "6789"),
                        ("SELECT 1 /* password: swordfish */", "swordfish"), ("SELECT 'é' -- t0k3n", "t0k3n")]:
        text = ecs.statement(sql)[0]
        assert text and secret not in text, text
    assert ecs.statement("ALTER ROLE bob SET app.key = 'k'")[0] == "ALTER ROLE bob SET app.key = $1"
    assert ecs.statement("SELECT 1 WHERE id = 2")[1] == ecs.statement("SELECT 1 WHERE id = 3")[1]
    long = "SELECT " + ", ".join(f"col_{i}" for i in range(2000)) + " FROM t"
    text = ecs.statement(long)[0]
    assert text.startswith("SELECT col_0, col_1") and len(text) < ecs.STATEMENT_MAX + 40
    assert text.endswith(f" …[{len(long) - ecs.STATEMENT_MAX} more characters]")


def test_documents_leave_out_empty_values_and_keep_ecs_basics():
    doc = ecs.document("login", ["authentication"], ["start"], "success", "m",
                       user={"name": "agent", "roles": []}, tls=None, pooler={"session": {"id": 3, "app": ""}})
    assert doc["user"] == {"name": "agent"} and "tls" not in doc and doc["pooler"] == {"session": {"id": 3}}
    assert doc["event"]["action"] == "login" and doc["ecs"]["version"] == ecs.ECS_VERSION
    assert ecs.endpoint("10.1.2.3:5000") == {"address": "10.1.2.3", "ip": "10.1.2.3", "port": 5000}
    assert ecs.endpoint("[::1]:5000")["ip"] == "::1" and ecs.endpoint("unix") == {"address": "unix"}


def _item(n: int) -> Item:
    return Item(b'{"n":%d}' % n, 6, "login", ecs.timestamp(time.time()))


def _accept_until(lsock, tail: bytes):
    """The next connection to a listening collector, and what it sent up to ``tail``."""
    conn, _ = lsock.accept()
    conn.settimeout(10)
    got = b""
    while not got.endswith(tail):
        got += conn.recv(4096)
    return conn, got


def _wait(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_file_destination_follows_a_rotated_file_and_counts_what_it_cannot_write(tmp_path):
    path = tmp_path / "logs" / "audit.jsonl"
    path.parent.mkdir()
    sink = FileSink(str(path), queue_size=100)
    sink.start()
    try:
        sink.put(_item(1))
        _wait(lambda: sink.sent == 1)
        path.rename(tmp_path / "logs" / "audit.jsonl.1")  # logrotate moves it away
        sink.put(_item(2))
        _wait(lambda: sink.sent == 2)
        assert path.read_bytes() == b'{"n":2}\n' and (tmp_path / "logs" / "audit.jsonl.1").read_bytes() == b'{"n":1}\n'
        (tmp_path / "logs" / "audit.jsonl.1").unlink()
        path.unlink()
        path.parent.rmdir()  # the directory is gone: the event is counted as failed
        sink.put(_item(3))
        _wait(lambda: sink.failed == 1)
        path.parent.mkdir()  # back: the next event is written
        sink.put(_item(4))
        _wait(lambda: sink.sent == 3)
        assert path.read_bytes() == b'{"n":4}\n'
    finally:
        sink.stop()


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path):
    sink = FileSink(str(tmp_path / "a.jsonl"), queue_size=3)  # not started: nothing drains the queue
    for i in range(10):
        sink.put(_item(i))  # never waits: the queue is full after three
    assert sink.dropped == 7 and len(sink.q) == 3


def test_syslog_over_tcp_reconnects_when_the_collector_closed_the_connection(tmp_path):
    import socket

    from pooler.audit.sinks import SyslogSink

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(2)
    lsock.settimeout(10)
    sink = SyslogSink(f"tcp://127.0.0.1:{lsock.getsockname()[1]}", 16, queue_size=10)
    sink.start()
    try:
        sink.put(_item(1))
        first, got = _accept_until(lsock, b'{"n":1}')
        first.close()  # the collector restarts
        _wait(lambda: sink.sent == 1)
        sink.put(_item(2))  # noticed before writing: a new connection, nothing lost
        second, got = _accept_until(lsock, b'{"n":2}')
        n, _, msg = got.partition(b" ")
        assert int(n) == len(msg) and RFC5424.match(msg)
        _wait(lambda: sink.sent == 2)
        assert sink.failed == 0
        second.close()
    finally:
        sink.stop()
        lsock.close()


def test_syslog_to_a_stream_unix_socket_uses_octet_counting(tmp_path):
    import socket

    from pooler.audit.sinks import SyslogSink

    path = tmp_path / "log.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a collector listening on a stream socket
    lsock.bind(str(path))
    lsock.listen(1)
    lsock.settimeout(10)
    sink = SyslogSink(f"unix:{path}", 16, queue_size=10)
    sink.start()
    try:
        sink.put(_item(1))
        sink.put(_item(2))
        conn, got = _accept_until(lsock, b'{"n":2}')
        msgs = []
        while got:
            n, _, rest = got.partition(b" ")
            msgs.append(rest[: int(n)])
            got = rest[int(n):]
        assert [RFC5424.match(m).group(6) for m in msgs] == [b'{"n":1}', b'{"n":2}']
        conn.close()
    finally:
        sink.stop()
        lsock.close()


def test_an_http_destination_is_logged_without_its_credentials():
    from pooler.audit.sinks import HttpSink, shown_url
    assert shown_url("https://u:pw@siem.example:8088/collector?dd-api-key=abc") == "https://siem.example:8088/collector?..."
    assert shown_url("http://h/x") == "http://h/x"
    from pooler.gateway.audit import _where
    assert "abc" not in _where(HttpSink("https://siem.example/c?key=abc", 10))


def test_a_datagram_too_large_for_udp_loses_only_itself():
    import socket

    from pooler.audit.sinks import SyslogSink

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(10)
    sink = SyslogSink(f"udp://127.0.0.1:{rx.getsockname()[1]}", 16, queue_size=10)
    big = Item(b'{"n":"' + b"x" * 70000 + b'"}', 6, "login", ecs.timestamp(time.time()))
    sink.put(_item(1))
    sink.put(big)  # larger than any UDP datagram
    sink.put(_item(2))
    sink.start()
    try:
        got = [rx.recv(65535), rx.recv(65535)]
        assert got[0].endswith(b'{"n":1}') and got[1].endswith(b'{"n":2}')
        _wait(lambda: sink.sent == 2 and sink.failed == 1)
    finally:
        sink.stop()
        rx.close()

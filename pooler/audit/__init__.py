"""The audit stream for a SIEM (docs/audit.md): ECS-named JSON documents (``ecs.py``) written
to a file, syslog (RFC 5424 over UDP, TCP or a Unix socket) and an HTTP endpoint, each from a
thread of its own behind a bounded queue (``sinks.py``). Nothing here knows the gateway: it
builds documents from plain values and delivers bytes."""

"""TLS contexts from the config (PgBouncer's client_tls_* / server_tls_* settings) and the demo's
self-signed certificate.

sslmode, as PgBouncer defines it for each side:
- clients: ``disable`` answers SSLRequest 'N'; ``allow``/``prefer`` use TLS when the client asks;
  ``require`` refuses TCP clients that do not use TLS; ``verify-ca``/``verify-full`` also require
  a client certificate signed by ``client_tls_ca_file``. Unix-socket clients never use TLS.
- servers: ``disable`` never asks; ``allow``/``prefer`` ask and fall back to plaintext when the
  server says 'N'; ``require`` insists on TLS without checking the certificate; ``verify-ca``
  checks it against ``server_tls_ca_file``; ``verify-full`` also checks the host name.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_VERSIONS = {
    "tlsv1.0": ssl.TLSVersion.TLSv1, "tlsv1": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1, "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}


def parse_protocols(v: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """PgBouncer's ``*_tls_protocols``: ``secure`` (default: TLS 1.2 and 1.3), ``all``,
    ``legacy``, ``default``, or a list such as ``tlsv1.2,tlsv1.3`` -> (minimum, maximum)."""
    s = v.strip().lower()
    if s in ("", "secure", "default"):
        return ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
    if s in ("all", "legacy"):
        return ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_3
    got = []
    for part in s.replace(",", " ").split():
        if part not in _VERSIONS:
            raise ValueError(f"unknown TLS protocol {part!r} (expected secure, all, or tlsv1.0..tlsv1.3)")
        got.append(_VERSIONS[part])
    return min(got), max(got)


def _no_passphrase() -> bytes:
    # never let OpenSSL prompt on a terminal (that would block the event loop on SIGHUP)
    raise ValueError("the key file is encrypted; give an unencrypted key (readable by the gateway only)")


def _apply_common(ctx: ssl.SSLContext, protocols: str, ciphers: str | None) -> None:
    lo, hi = parse_protocols(protocols)
    ctx.minimum_version = lo
    ctx.maximum_version = hi
    if ciphers and ciphers.lower() not in ("default", "fast", "normal", "secure"):
        ctx.set_ciphers(ciphers)
    ctx.options |= ssl.OP_NO_COMPRESSION


def client_side_context(sslmode: str, cert: str | None, key: str | None, ca: str | None,
                        protocols: str = "secure", ciphers: str | None = None) -> ssl.SSLContext | None:
    """The gateway's server-side context for its clients (None for sslmode=disable)."""
    if sslmode == "disable":
        return None
    if not cert or not key:
        raise ValueError(f"client_tls_sslmode = {sslmode} needs client_tls_cert_file and client_tls_key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_common(ctx, protocols, ciphers)
    ctx.load_cert_chain(cert, key, password=_no_passphrase)
    if sslmode in ("verify-ca", "verify-full"):
        if not ca:
            raise ValueError(f"client_tls_sslmode = {sslmode} needs client_tls_ca_file")
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_side_context(sslmode: str, cert: str | None, key: str | None, ca: str | None,
                        protocols: str = "secure", ciphers: str | None = None) -> ssl.SSLContext | None:
    """The gateway's client-side context towards PostgreSQL (None for sslmode=disable)."""
    if sslmode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_common(ctx, protocols, ciphers)
    if sslmode in ("verify-ca", "verify-full"):
        if ca:
            ctx.load_verify_locations(ca)
        else:
            ctx.load_default_certs()
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = sslmode == "verify-full"
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert or key:
        if not (cert and key):
            raise ValueError("server_tls_cert_file and server_tls_key_file go together")
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    return ctx


def make_self_signed(cert_path: str | os.PathLike, key_path: str | os.PathLike,
                     hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"), days: int = 825) -> None:
    """A self-signed certificate (EC P-256) for the demo; the key file is private (0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    kp = Path(key_path)
    kp.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))

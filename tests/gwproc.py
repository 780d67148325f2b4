"""Run the gateway as a real subprocess with a generated ini, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"gateway did not listen on {host}:{port}")


class GatewayProc:
    """``pooler run`` in a subprocess. ``settings`` go to [gateway]; ``databases`` and ``users``
    to their sections; ``auth_users`` become the auth_file."""

    def __init__(self, databases: dict[str, str], settings: dict | None = None,
                 auth_users: dict[str, str] | None = None, users: dict[str, str] | None = None,
                 workdir: str | None = None, repo: Path | None = None, module: str = "pooler") -> None:
        self.repo = Path(repo) if repo is not None else REPO  # the checkout whose pooler runs
        self.module = module  # what `python -m` runs: the gateway, or a bench's variant of it
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pooler-gw-"))
        self.port = free_port()
        self.host = "127.0.0.1"
        self.databases = databases
        self.settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "auth_type": "trust",
            "pool_mode": "transaction",
            "default_pool_size": "5",
            "max_client_conn": "200",
            "query_wait_timeout": "30",
        }
        self.settings.update({k: str(v) for k, v in (settings or {}).items()})
        self.auth_users = auth_users
        self.users = users or {}
        self.ini = self.dir / "gateway.ini"
        self.logpath = self.dir / "gateway.log"
        self.proc: subprocess.Popen | None = None
        self.write_ini()

    def write_ini(self) -> None:
        lines = ["[databases]"]
        lines += [f"{k} = {v}" for k, v in self.databases.items()]
        lines.append("[gateway]")
        if self.auth_users is not None:
            af = self.dir / "userlist.txt"
            af.write_text("".join(f'"{u}" "{p}"\n' for u, p in self.auth_users.items()))
            self.settings.setdefault("auth_file", str(af))
        lines += [f"{k} = {v}" for k, v in self.settings.items()]
        if self.users:
            lines.append("[users]")
            lines += [f"{k} = {v}" for k, v in self.users.items()]
        self.ini.write_text("\n".join(lines) + "\n")

    def start(self) -> "GatewayProc":
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.repo) + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(self.logpath, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "run", str(self.ini)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.repo)
        try:
            wait_port(self.host, self.port, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"gateway failed to start:\n{self.log()}")
        return self

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None, **kw) -> str:
        parts = [f"host={self.host}", f"port={self.port}", f"dbname={dbname}", f"user={user}",
                 "sslmode=disable", "connect_timeout=10"]
        if password is not None:
            parts.append(f"password={password}")
        parts += [f"{k}={v}" for k, v in kw.items()]
        return " ".join(parts)

    def url(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None) -> str:
        pw = f":{password}" if password is not None else ""
        return f"postgresql://{user}{pw}@{self.host}:{self.port}/{dbname}"

    def log(self) -> str:
        try:
            return self.logpath.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        """Wait until the log contains ``needle`` (polling the file the gateway writes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not in gateway log:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.send_signal(signal.SIGTERM)  # the second signal: immediately
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "GatewayProc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

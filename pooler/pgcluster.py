"""Throwaway PostgreSQL clusters for tests, benchmarks and ``pooler demo`` (stdlib only).

    with PgCluster() as pg:                     # initdb + start on a free port
        pg.execute("CREATE TABLE t (x int)")
        conn = psycopg.connect(pg.dsn())        # TCP, superuser + password (scram-sha-256)

Each cluster lives in its own temporary directory that :meth:`PgCluster.stop` removes.
Clusters still running at interpreter exit are stopped by an ``atexit`` hook, and a small
watchdog process stops the server and removes the directory if the owning Python process dies
without running ``atexit`` (SIGKILL, crash), so a broken test session leaves nothing behind.

initdb and postgres refuse to run as root: when ``os.geteuid() == 0`` the directories are
chowned to the ``postgres`` OS user and the server programs run through ``runuser``
(or ``su`` where runuser is missing). psql always runs as the calling user.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["PgCluster", "PgClusterError", "find_pg_bindir", "free_port", "seed_demo", "DEMO_SQL"]

DEMO_SQL = Path(__file__).with_name("demo_data.sql")
_NOT_FOUND = "PostgreSQL server binaries (initdb, pg_ctl) not found; install the postgresql package"
_SIGHUP_MSG = "received SIGHUP, reloading configuration files"


class PgClusterError(RuntimeError):
    """A PostgreSQL program failed; the message carries its output or the server log tail."""


# --------------------------------------------------------------------------- helpers

def _has_server(bindir: str | os.PathLike | None) -> bool:
    return bool(bindir) and all(os.access(os.path.join(bindir, p), os.X_OK) for p in ("initdb", "pg_ctl"))


def _version_key(path: str) -> tuple:
    name = Path(path).parent.name  # /usr/lib/postgresql/<ver>/bin
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.]", name))


def find_pg_bindir() -> str:
    """Directory holding initdb/pg_ctl/postgres: $POOLER_PG_BINDIR, ``pg_config --bindir``,
    the newest ``/usr/lib/postgresql/*/bin``, then $PATH. Raises RuntimeError if none."""
    env = os.environ.get("POOLER_PG_BINDIR")
    if env:
        if _has_server(env):
            return os.path.abspath(env)
        raise RuntimeError(f"POOLER_PG_BINDIR={env!r} has no initdb/pg_ctl; {_NOT_FOUND}")
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and _has_server(out.stdout.strip()):
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _has_server(d):
            return d
    initdb = shutil.which("initdb")
    if initdb and _has_server(os.path.dirname(initdb)):
        return os.path.dirname(initdb)
    raise RuntimeError(_NOT_FOUND)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _quote_dsn(value: str) -> str:
    if value and re.fullmatch(r"[A-Za-z0-9._/:@+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus every PG* variable (PGDATA, PGPORT, PGSERVICE... would interfere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# The watchdog: blocks reading stdin (a pipe whose only writer is the owning process); at EOF
# (the owner closed it in stop(), or died) it stops a still-running server and removes the dir.
_WATCHDOG = r"""
import json, os, shutil, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
spec = json.loads(sys.argv[1])
try:
    sys.stdin.buffer.read()
except BaseException:
    pass
pidfile = os.path.join(spec["data_dir"], "postmaster.pid")
if os.path.exists(pidfile):
    try:
        subprocess.run(spec["stop_cmd"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, timeout=30)
    except Exception:
        pass
    try:
        pid = int(open(pidfile).readline())
        os.kill(pid, signal.SIGKILL)
    except Exception:
        pass
if os.path.isdir(spec["base_dir"]):
    for _ in range(50):
        shutil.rmtree(spec["base_dir"], ignore_errors=True)
        if not os.path.exists(spec["base_dir"]):
            break
        time.sleep(0.1)
"""

_LIVE: list["PgCluster"] = []


@atexit.register
def _cleanup_all() -> None:
    for cluster in list(_LIVE):
        try:
            cluster.stop()
        except Exception:
            pass


# --------------------------------------------------------------------------- the cluster

class PgCluster:
    """A private PostgreSQL server in a temporary directory.

    ``base_dir`` is the parent of the temporary directory (default: the system temp dir);
    ``port`` defaults to a free one. Attributes: ``host``, ``port``, ``superuser``,
    ``password``, ``bindir`` and, once started, ``base_dir``, ``data_dir``, ``socket_dir``,
    ``log_path``.
    """

    superuser = "postgres"
    SETTINGS = {
        "max_connections": "200",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "128MB",
        "logging_collector": "off",
        "password_encryption": "scram-sha-256",
        "log_min_messages": "warning",
        "timezone": "UTC",
        "log_timezone": "UTC",
    }

    def __init__(self, base_dir: str | os.PathLike | None = None, port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.bindir = find_pg_bindir()
        self.host = host
        self._auto_port = port is None
        self.port = port if port is not None else free_port(host)
        self.password = secrets.token_urlsafe(18)
        self._parent_dir = str(base_dir) if base_dir is not None else None
        self.base_dir: str | None = None
        self.data_dir: str | None = None
        self.socket_dir: str | None = None
        self.log_path: str | None = None
        self.extra_settings: dict[str, str] = {}
        self._as_root = os.geteuid() == 0
        self._watchdog: subprocess.Popen | None = None

    # ------------------------------------------------------------------ running programs

    def _bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def _server_cmd(self, argv: list[str]) -> list[str]:
        """argv run as the postgres OS user when we are root."""
        if not self._as_root:
            return argv
        if shutil.which("runuser"):
            return ["runuser", "-u", "postgres", "--", *argv]
        import shlex
        return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(argv)]

    def _run_server(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self._server_cmd(argv), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, cwd=self.base_dir or "/",
                              env=_clean_env(LC_ALL="C", LANG="C"))

    def _chown(self, path: str) -> None:
        if self._as_root:
            import pwd
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _write(self, path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)
        self._chown(path)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path or "", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no server log)"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "PgCluster":
        """initdb a fresh cluster in a new temporary directory and start it."""
        if self.data_dir is not None:
            if not self.running:
                self.start_server()
            return self
        if self._as_root:
            try:
                import pwd
                pwd.getpwnam("postgres")
            except KeyError:
                raise PgClusterError("running as root needs a 'postgres' OS user to run the server") from None
        self.base_dir = tempfile.mkdtemp(prefix="pooler-pg-", dir=self._parent_dir)
        self._chown(self.base_dir)
        _LIVE.append(self)
        try:
            self.data_dir = os.path.join(self.base_dir, "data")
            self.socket_dir = os.path.join(self.base_dir, "sock")
            if len(self.socket_dir) > 80:  # unix socket paths are limited to ~107 bytes
                self.socket_dir = tempfile.mkdtemp(prefix="pooler-pgsock-")
            else:
                os.mkdir(self.socket_dir, 0o700)
            self._chown(self.socket_dir)
            self.log_path = os.path.join(self.data_dir, "server.log")
            self._start_watchdog()
            self._initdb()
            self.start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self) -> None:
        assert self.base_dir and self.data_dir
        pwfile = os.path.join(self.base_dir, "pwfile")
        self._write(pwfile, self.password + "\n")
        try:
            r = self._run_server([
                self._bin("initdb"), "-D", self.data_dir, "--auth-local=trust",
                "--auth-host=scram-sha-256", f"--username={self.superuser}", f"--pwfile={pwfile}",
                "-E", "UTF8", "--locale=C", "--no-sync"])
        finally:
            os.unlink(pwfile)
        if r.returncode != 0:
            hint = (f"\n(the postgres OS user must be able to reach {self.base_dir})"
                    if self._as_root else "")
            raise PgClusterError(f"initdb failed ({r.returncode}):\n{r.stdout}\n{r.stderr}{hint}")
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as f:
            f.write("\n# added by pooler.pgcluster\ninclude_if_exists = 'pooler_cluster.conf'\n")
        self._write(os.path.join(self.data_dir, "pg_hba.conf"), "\n".join(self.default_hba()) + "\n")

    def _write_settings(self) -> None:
        assert self.data_dir and self.socket_dir
        settings = {"listen_addresses": self.host, "port": str(self.port),
                    "unix_socket_directories": self.socket_dir, **self.SETTINGS, **self.extra_settings}
        text = "".join(f"{k} = {quote_literal(str(v))}\n" for k, v in settings.items())
        self._write(os.path.join(self.data_dir, "pooler_cluster.conf"), text)

    def start_server(self, timeout: int = 60) -> None:
        """Start the server on existing data (after :meth:`stop_server`)."""
        if self.data_dir is None:
            raise PgClusterError("cluster not initialised; call start()")
        for attempt in range(4):
            self._write_settings()
            log_size = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
            r = self._run_server([self._bin("pg_ctl"), "start", "-D", self.data_dir, "-l", self.log_path,
                                  "-w", "-t", str(timeout)], timeout=timeout + 30)
            if r.returncode == 0:
                return
            with open(self.log_path, errors="replace") as f:
                f.seek(log_size)
                new_log = f.read()
            if self._auto_port and attempt < 3 and ("could not bind" in new_log or "in use" in new_log):
                self.port = free_port(self.host)  # lost a race for the port: pick another
                continue
            raise PgClusterError(f"pg_ctl start failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                                 f"last lines of {self.log_path}:\n{self.log_tail(30)}")

    def stop_server(self, mode: str = "fast", timeout: int = 60) -> None:
        """Stop the server, keeping the data (mode: smart, fast or immediate)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad shutdown mode {mode!r}")
        if not self.running:
            return
        r = self._run_server([self._bin("pg_ctl"), "stop", "-D", self.data_dir, "-m", mode,
                              "-w", "-t", str(timeout)], timeout=timeout + 30)
        if r.returncode != 0 and self.running:
            raise PgClusterError(f"pg_ctl stop -m {mode} failed: {r.stdout}{r.stderr}\n{self.log_tail(30)}")

    def restart(self) -> None:
        """Fast shutdown and start again on the same data and port."""
        self.stop_server("fast")
        self.start_server()

    def stop(self) -> None:
        """Stop the server (fast, escalating to immediate, then SIGKILL) and remove its files."""
        try:
            if self.data_dir is not None:
                for mode in ("fast", "immediate"):
                    try:
                        self.stop_server(mode, timeout=30)
                        break
                    except (PgClusterError, subprocess.SubprocessError):
                        continue
                pid = self.pid
                if pid is not None and _pid_alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            for d in (self.base_dir, self.socket_dir):
                if d:
                    shutil.rmtree(d, ignore_errors=True)
        finally:
            self._stop_watchdog()
            if self in _LIVE:
                _LIVE.remove(self)
            self.base_dir = self.data_dir = self.socket_dir = None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, from postmaster.pid (None when not running)."""
        if not self.data_dir:
            return None
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        pid = self.pid
        return pid is not None and _pid_alive(pid)

    def _start_watchdog(self) -> None:
        spec = {"data_dir": self.data_dir, "base_dir": self.base_dir,
                "stop_cmd": self._server_cmd([self._bin("pg_ctl"), "stop", "-D", self.data_dir,
                                              "-m", "immediate", "-w", "-t", "20"])}
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, json.dumps(spec)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", start_new_session=True,
            env=_clean_env(LC_ALL="C", LANG="C"))

    def _stop_watchdog(self) -> None:
        w, self._watchdog = self._watchdog, None
        if w is None:
            return
        try:
            w.stdin.close()
            w.wait(30)
        except (OSError, subprocess.SubprocessError):
            pass

    def __enter__(self) -> "PgCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PgCluster {self.host}:{self.port} {state} {self.data_dir}>"

    # ------------------------------------------------------------------ connecting

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """libpq keyword DSN over TCP. Without ``user``: the superuser and its password."""
        if user is None:
            user = self.superuser
            if password is None:
                password = self.password
        parts = {"host": self.host, "port": str(self.port), "dbname": dbname, "user": user}
        if password is not None:
            parts["password"] = password
        return " ".join(f"{k}={_quote_dsn(v)}" for k, v in parts.items())

    def url(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """The same as :meth:`dsn` as a postgresql:// URL (for asyncpg)."""
        from urllib.parse import quote
        if user is None:
            user = self.superuser
            if password is None:
                password = self.password
        cred = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{cred}@{host}:{self.port}/{quote(dbname, safe='')}"

    def psql(self, sql: str, dbname: str = "postgres", user: str | None = None,
             tuples_only: bool = True, timeout: float = 300) -> str:
        """Run ``sql`` (any number of statements) with psql over the unix socket, stopping at the
        first error; return stdout (unaligned, tuples only by default). Raises PgClusterError."""
        return self._psql(["-f", "-"], sql, dbname, user, tuples_only, timeout)

    def execute(self, sql: str, dbname: str = "postgres", user: str | None = None) -> None:
        """Run ``sql`` via ``psql -v ON_ERROR_STOP=1``, discarding output."""
        self._psql(["-f", "-"], sql, dbname, user, True, 300)

    def execute_file(self, path: str | os.PathLike, dbname: str = "postgres", user: str | None = None) -> None:
        """Run an SQL script file via ``psql -v ON_ERROR_STOP=1 -f path``."""
        self._psql(["-f", str(path)], None, dbname, user, True, 600)

    def _psql(self, args: list[str], stdin: str | None, dbname: str, user: str | None,
              tuples_only: bool, timeout: float) -> str:
        if self.socket_dir is None:
            raise PgClusterError("cluster not started")
        psql = self._bin("psql") if os.access(self._bin("psql"), os.X_OK) else shutil.which("psql")
        if not psql:
            raise PgClusterError("psql not found; install the postgresql-client package")
        argv = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-A", "-h", self.socket_dir,
                "-p", str(self.port), "-U", user or self.superuser, "-d", dbname]
        if tuples_only:
            argv.append("-t")
        r = subprocess.run(argv + args, input=stdin if stdin is not None else "", capture_output=True,
                           text=True, timeout=timeout, env=_clean_env(PGPASSWORD=self.password,
                                                                      PGCONNECT_TIMEOUT="10"))
        if r.returncode != 0:
            raise PgClusterError(f"psql failed ({r.returncode}) on {dbname}: {r.stderr.strip()}")
        return r.stdout

    # ------------------------------------------------------------------ roles, databases, hba

    def create_role(self, name: str, password: str | None = None, method: str = "scram-sha-256",
                    superuser: bool = False, login: bool = True) -> None:
        """CREATE ROLE with the password stored as ``method`` (scram-sha-256 or md5)."""
        if method not in ("scram-sha-256", "md5"):
            raise ValueError(f"method must be 'scram-sha-256' or 'md5', not {method!r}")
        sql = (f"SET password_encryption = {quote_literal(method)};\n"
               f"CREATE ROLE {quote_ident(name)} {'SUPERUSER' if superuser else 'NOSUPERUSER'}"
               f" {'LOGIN' if login else 'NOLOGIN'}")
        if password is not None:
            sql += f" PASSWORD {quote_literal(password)}"
        self.execute(sql + ";\n")

    def create_database(self, name: str, owner: str | None = None) -> None:
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if owner:
            sql += f" OWNER {quote_ident(owner)}"
        self.execute(sql + ";\n")

    @staticmethod
    def default_hba() -> list[str]:
        return [
            "local all all trust",
            "host all all 127.0.0.1/32 scram-sha-256",
            "host all all ::1/128 scram-sha-256",
            "local replication all trust",
            "host replication all 127.0.0.1/32 scram-sha-256",
        ]

    def set_hba(self, lines: list[str], keep_superuser_local: bool = True) -> None:
        """Rewrite pg_hba.conf with ``lines`` (first match wins) and reload; returns once the
        server has reloaded. ``keep_superuser_local`` puts ``local all postgres trust`` first so
        the psql helpers keep working. Invalid rules: the old file is restored and
        PgClusterError raised."""
        if self.data_dir is None:
            raise PgClusterError("cluster not started")
        lines = list(lines)
        if keep_superuser_local:
            lines.insert(0, f"local all {self.superuser} trust")
        path = os.path.join(self.data_dir, "pg_hba.conf")
        with open(path) as f:
            old = f.read()
        self._write(path, "# written by PgCluster.set_hba\n" + "\n".join(lines) + "\n")
        if not self.running:
            return
        try:
            errors = self.psql("SELECT line_number || ': ' || error FROM pg_hba_file_rules "
                               "WHERE error IS NOT NULL")
        except PgClusterError:
            errors = ""
        if errors.strip():
            self._write(path, old)
            raise PgClusterError(f"invalid pg_hba.conf lines:\n{errors}")
        self.reload()

    def reset_hba(self) -> None:
        self.set_hba(self.default_hba(), keep_superuser_local=False)

    def set_settings(self, **settings: str) -> None:
        """Change server settings (applied by reload; some need :meth:`restart`)."""
        self.extra_settings.update({k: str(v) for k, v in settings.items()})
        self._write_settings()
        if self.running:
            self.reload()

    def reload(self, timeout: float = 10) -> None:
        """``pg_ctl reload`` and wait until the server logged that it reloaded."""
        def count() -> int:
            try:
                with open(self.log_path, errors="replace") as f:
                    return f.read().count(_SIGHUP_MSG)
            except OSError:
                return 0
        before = count()
        r = self._run_server([self._bin("pg_ctl"), "reload", "-D", self.data_dir])
        if r.returncode != 0:
            raise PgClusterError(f"pg_ctl reload failed: {r.stdout}{r.stderr}")
        deadline = time.monotonic() + timeout
        while count() <= before:
            if time.monotonic() > deadline:
                raise PgClusterError(f"server did not reload within {timeout}s:\n{self.log_tail(30)}")
            time.sleep(0.01)


def seed_demo(cluster: PgCluster, dbname: str = "shop", owner: str | None = None) -> str:
    """Create ``dbname`` (unless it exists) and load the demo "shop" schema and data into it."""
    exists = cluster.psql(f"SELECT 1 FROM pg_database WHERE datname = {quote_literal(dbname)}").strip()
    if not exists:
        cluster.create_database(dbname, owner=owner)
    path = DEMO_SQL
    if not path.exists():  # installed as a zip or similar: go through importlib.resources
        from importlib.resources import files
        text = files("pooler").joinpath("demo_data.sql").read_text()
        cluster.psql(text, dbname=dbname, user=owner)
    else:
        cluster.execute_file(path, dbname=dbname, user=owner)
    return dbname

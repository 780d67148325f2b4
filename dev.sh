#!/usr/bin/env bash
# Developer entry point for a fresh Debian/Ubuntu machine (run as root or as a sudo user).
#
#   ./dev.sh setup [--with-pgbouncer] [--with-exporter] [--with-browser]
#                                       install what is missing (OS packages, .venv); idempotent
#   ./dev.sh test  [pytest args]        setup (with the exporter and browser the tests drive), then run the tests
#   ./dev.sh demo  [args]               setup, then `pooler demo`
#   ./dev.sh bench [args]               setup (with pgbouncer), then bench/pgbench_compare.py
#
# Environment: PYTHON (interpreter to build .venv from, >= 3.11), POOLER_PG_BINDIR (PostgreSQL
# server binaries; otherwise found like pooler/pgcluster.py:find_pg_bindir does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD
VENV=$ROOT/.venv

log() { printf '[dev.sh] %s\n' "$*" >&2; }
die() { printf '[dev.sh] error: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

# ------------------------------------------------------------------ OS packages (apt-get)
APT_UPDATED=0
apt_update_once() {
  [ "$APT_UPDATED" -eq 1 ] && return 0
  command -v apt-get >/dev/null 2>&1 ||
    die "missing OS packages ($*) and no apt-get here: install them by hand (PostgreSQL server + client, python3 venv)"
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then die "need root or sudo to install OS packages: $*"; fi
  log "apt-get update"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 ||
    die "apt-get update failed"
  APT_UPDATED=1
}

apt_available() {  # is there an installable candidate for package $1?
  local cand
  cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
  [ -n "$cand" ] && [ "$cand" != "(none)" ]
}

apt_install() {
  [ $# -gt 0 ] || return 0
  apt_update_once "$@"
  log "apt-get install $*"
  local out
  out=$(mktemp)
  if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
      --no-install-recommends "$@" >"$out" 2>&1; then
    tail -n 40 "$out" >&2
    rm -f "$out"
    die "apt-get install $* failed"
  fi
  rm -f "$out"
}

# ------------------------------------------------------------------ PostgreSQL
has_server() { [ -n "$1" ] && [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ]; }

# Same order as pooler.pgcluster.find_pg_bindir: $POOLER_PG_BINDIR, pg_config --bindir,
# newest /usr/lib/postgresql/*/bin, then $PATH.
find_pg_bindir() {
  local d
  if [ -n "${POOLER_PG_BINDIR:-}" ]; then
    has_server "$POOLER_PG_BINDIR" && { echo "$POOLER_PG_BINDIR"; return 0; }
    die "POOLER_PG_BINDIR=$POOLER_PG_BINDIR has no initdb/pg_ctl"
  fi
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null || true)
    has_server "$d" && { echo "$d"; return 0; }
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -V -r); do
    has_server "$d" && { echo "$d"; return 0; }
  done
  d=$(command -v initdb 2>/dev/null || true)
  if [ -n "$d" ] && has_server "$(dirname "$d")"; then dirname "$d"; return 0; fi
  return 1
}

# psql/pgbench on PATH must actually run (on Debian /usr/bin/psql is a wrapper script that
# exists even when the real client is missing). The server bindir is appended to PATH as a
# fallback, so a PostgreSQL built elsewhere works too.
tool_ok() { "$1" --version >/dev/null 2>&1; }

ensure_postgres() {
  local bindir pkgs=()
  bindir=$(find_pg_bindir || true)
  if [ -n "$bindir" ]; then export PATH="$PATH:$bindir"; else pkgs+=(postgresql); fi
  tool_ok psql || pkgs+=(postgresql-client)
  # pgbench ships with the server package on Debian/Ubuntu (postgresql-NN); postgresql-contrib
  # pulls that in where the server itself is found elsewhere.
  if ! tool_ok pgbench && [ -n "$bindir" ]; then pkgs+=(postgresql-contrib); fi
  if [ ${#pkgs[@]} -gt 0 ]; then
    apt_install "${pkgs[@]}"
    bindir=$(find_pg_bindir || true)
    [ -n "$bindir" ] || die "PostgreSQL server binaries (initdb, pg_ctl) not found even after installing ${pkgs[*]}"
    export PATH="$PATH:$bindir"
  fi
  tool_ok psql || die "psql does not run; install the postgresql-client package"
  tool_ok pgbench || die "pgbench does not run; install the postgresql (or postgresql-contrib) package"
  PG_BINDIR=$bindir
}

# Debian's prometheus-pgbouncer-exporter: tests/test_admin_console.py scrapes the console with it
ensure_exporter() {
  command -v prometheus-pgbouncer-exporter >/dev/null 2>&1 && return 0
  apt_install prometheus-pgbouncer-exporter
  command -v prometheus-pgbouncer-exporter >/dev/null 2>&1 || die "prometheus-pgbouncer-exporter not found after installing it"
}

# Debian's chromium and chromedriver: tests/test_approvals_page.py drives the approvals page headless
ensure_browser() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then return 0; fi
  apt_install chromium chromium-driver
  command -v chromedriver >/dev/null 2>&1 || die "chromedriver not found after installing chromium-driver"
}

ensure_pgbouncer() {
  export PATH="$PATH:/usr/sbin:/usr/local/sbin"
  command -v pgbouncer >/dev/null 2>&1 || apt_install pgbouncer
  command -v pgbouncer >/dev/null 2>&1 || die "pgbouncer not found after installing it"
}

# ------------------------------------------------------------------ Python
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

find_python() {
  local p
  if [ -n "${PYTHON:-}" ]; then
    python_ok "$PYTHON" || die "PYTHON=$PYTHON is not Python >= 3.11"
    echo "$PYTHON"; return 0
  fi
  for p in python3 python3.13 python3.12 python3.11; do
    if command -v "$p" >/dev/null 2>&1 && python_ok "$p"; then echo "$p"; return 0; fi
  done
  local have
  have=$(python3 --version 2>&1 || echo "no python3")
  die "Python >= 3.11 is required (found: $have). Install python3.11 or newer, or set PYTHON=/path/to/python3.11"
}

# what a set-up .venv imports: the test tools and the compiled parts, built from these sources
COMPILED_CHECK='import sys, pytest, psycopg, pooler.masking._rows, pooler.recording._seal, pooler.sql; sys.exit(pooler.sql.compiled != ["analyzer", "lineage"])'

ensure_venv() {
  local py ver stamp
  if ! { [ -x "$VENV/bin/python" ] && python_ok "$VENV/bin/python"; }; then
    py=$(find_python)
    rm -rf "$VENV"
    log "creating .venv with $("$py" --version 2>&1)"
    if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
      rm -rf "$VENV"
      ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
      local pkgs=(python3-venv)
      apt_update_once python3-venv
      if apt_available "python$ver-venv"; then pkgs+=("python$ver-venv"); fi
      apt_install "${pkgs[@]}"
      "$py" -m venv "$VENV" || die "python3 -m venv failed even after installing ${pkgs[*]}"
    fi
  fi
  # Reinstall only when pyproject.toml, setup.py, the compiled sources (or the venv's Python)
  # changed: fast when up to date.
  stamp="$(cat pyproject.toml setup.py pooler/masking/_rows.pyx pooler/recording/_seal.pyx pooler/sql/analyzer.py pooler/sql/lineage.py |
           sha256sum | cut -d' ' -f1) $("$VENV/bin/python" --version 2>&1)"
  if [ -f "$VENV/.dev-stamp" ] && [ "$(cat "$VENV/.dev-stamp")" = "$stamp" ] &&
     [ -x "$VENV/bin/pooler" ] && "$VENV/bin/python" -c "$COMPILED_CHECK" >/dev/null 2>&1; then
    return 0
  fi
  ensure_compiler
  log "pip install -e '.[test]' into .venv (builds pooler/masking/_rows.pyx and pooler/recording/_seal.pyx, compiles pooler/sql/analyzer.py and lineage.py)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" >&2 ||
    die "pip install -e '.[test]' failed"
  "$VENV/bin/python" -c "$COMPILED_CHECK" ||
    die "the compiled parts (pooler/masking/_rows.pyx, pooler/recording/_seal.pyx, pooler/sql/analyzer.py and lineage.py) did not build: see the pip output above"
  echo "$stamp" >"$VENV/.dev-stamp"
}

# A C compiler, the Python headers and OpenSSL's (the recordings' hash chain, _seal.pyx) build
# the compiled parts (Cython comes from PyPI as a build requirement).
ensure_compiler() {
  local pkgs=()
  command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || pkgs+=(gcc libc6-dev)
  [ -f /usr/include/openssl/sha.h ] || pkgs+=(libssl-dev)
  if ! "$VENV/bin/python" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    pkgs+=(python3-dev)
  fi
  if [ ${#pkgs[@]} -gt 0 ]; then apt_install "${pkgs[@]}"; fi
}

setup() {
  local with_pgbouncer=0 with_exporter=0 with_browser=0 a
  for a in "$@"; do
    case "$a" in
      --with-pgbouncer) with_pgbouncer=1 ;;
      --with-exporter) with_exporter=1 ;;
      --with-browser) with_browser=1 ;;
      *) die "setup: unknown option $a" ;;
    esac
  done
  find_python >/dev/null
  ensure_postgres
  if [ "$with_pgbouncer" -eq 1 ]; then ensure_pgbouncer; fi
  if [ "$with_exporter" -eq 1 ]; then ensure_exporter; fi
  if [ "$with_browser" -eq 1 ]; then ensure_browser; fi
  ensure_venv
  log "ready (PostgreSQL: $PG_BINDIR, Python: $("$VENV/bin/python" --version 2>&1))"
}

usage() { sed -n '2,10s/^# \{0,1\}//p' "$0"; }

cmd=${1:-help}
if [ $# -gt 0 ]; then shift; fi
case "$cmd" in
  setup) setup "$@" ;;
  test)  setup --with-exporter --with-browser; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  demo)  setup; exec "$VENV/bin/pooler" demo "$@" ;;
  bench) setup --with-pgbouncer; exec "$VENV/bin/python" bench/pgbench_compare.py "$@" ;;
  help|-h|--help) usage ;;
  *) usage >&2; die "unknown command: $cmd" ;;
esac

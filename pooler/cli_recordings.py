"""``pooler recordings verify DIR``: is every recording whole and unchanged (docs/recordings.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _key(args: argparse.Namespace) -> bytes | None:
    if args.key_file:
        try:
            key = Path(args.key_file).read_bytes().strip()
        except OSError as e:
            raise SystemExit(f"pooler recordings: cannot read --key-file {args.key_file}: {e.strerror}")
        if not key:
            raise SystemExit(f"pooler recordings: --key-file {args.key_file} is empty")
        return key
    if args.key_env:
        key = os.environ.get(args.key_env, "").strip()
        if not key:
            raise SystemExit(f"pooler recordings: environment variable {args.key_env} is not set")
        return key.encode()
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    from .recording.verify import verify

    root = Path(args.dir)
    if not root.is_dir():
        print(f"pooler recordings: {root} is not a directory", file=sys.stderr)
        return 2
    rep = verify(root, _key(args))
    if args.json:
        print(json.dumps({"ok": rep.ok, "files": rep.files, "records": rep.records, "problems": rep.problems,
                          "notes": rep.notes}, indent=2))
        return 0 if rep.ok else 1
    for p in rep.problems:
        print(f"BROKEN  {p}")
    for n in rep.notes:
        print(f"note    {n}")
    if rep.ok:
        print(f"ok: {rep.files} file(s), {rep.records} record(s), the chain holds")
        return 0
    print(f"FAILED: {len(rep.problems)} problem(s) in {rep.files} file(s), {rep.records} record(s)")
    return 1


def add_parser(sub) -> None:
    r = sub.add_parser("recordings", help="session recordings: verify the hash chain")
    rs = r.add_subparsers(dest="recordings_cmd", required=True)
    v = rs.add_parser("verify", help="check every file's hash chain: changed, removed or cut-off records, deleted files")
    v.add_argument("dir", help="the recordings directory (record_dir)")
    v.add_argument("--key-file", help="file holding the HMAC key (record_hmac_key_file)")
    v.add_argument("--key-env", help="environment variable holding the HMAC key (record_hmac_key_env)")
    v.add_argument("--json", action="store_true", help="the report as JSON")
    v.set_defaults(func=cmd_verify)

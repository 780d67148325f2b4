"""``pooler recordings verify DIR``: the hash chain of every file checked, in order.

Reports (file and line) the first record whose hash does not match in each file (changed,
inserted, reordered, or one before it removed), a file that does not start from the last hash
of the file before (records removed at the end of that file, or a file replaced), a file cut off
(half a record, a compressed stream ending early, no ``close`` record), and sequence numbers
missing between files (a deleted file), except files a ``retention`` record names. A verifier
without the HMAC key of HMAC-chained files says so instead of guessing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import orjson

from .files import NAME, list_files, read_lines
from .format import GENESIS, key_id, link, unseal


@dataclass
class Report:
    files: int = 0
    records: int = 0
    problems: list[str] = field(default_factory=list)  # evidence of tampering or loss
    notes: list[str] = field(default_factory=list)  # what is fine but worth knowing

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(root: str | os.PathLike, key: bytes | None = None) -> Report:
    rep = Report()
    files = list_files(root)
    rep.files = len(files)
    if not files:
        rep.notes.append(f"no recording files under {root}")
        return rep
    gaps: list[tuple[int, int, str, str]] = []  # (first missing, last missing, before, after)
    retained: set[int] = set()  # sequence numbers retention says it removed
    prev_h: bytes | None = None
    prev_name = ""
    prev_seq: int | None = None
    pending_unclosed: str | None = None  # the file before ended without close: a problem unless a gap follows
    key = key or None
    told_keys: set[tuple[str, object]] = set()  # key problems reported already (once, not once per file)
    unchecked_files = 0
    for idx, f in enumerate(files):
        name = f"{f.path.parent.name}/{f.path.name}"
        newest = idx == len(files) - 1
        seq_gap = prev_seq is not None and f.seq != prev_seq + 1
        if seq_gap:
            gaps.append((prev_seq + 1, f.seq - 1, prev_name, name))
        if prev_seq is not None and f.seq == prev_seq:
            rep.problems.append(f"{name}: a second file with sequence number {f.seq}")
        try:
            lines, cut = read_lines(f.path)
        except OSError as e:
            rep.problems.append(f"{name}: cannot be read: {e}")
            prev_seq, prev_name, prev_h = f.seq, name, None
            continue
        chain: bytes | None = None
        broken = 0
        last_type = None
        count = 0
        second_type = None
        close_rec = None
        unchecked = False  # chained with a key the verifier lacks: nothing more can be told of it
        for lineno, line in enumerate(lines, 1):
            got = unseal(line)
            rec = None
            if got is not None:
                try:
                    rec = orjson.loads(got[0])
                except orjson.JSONDecodeError:
                    rec = None
            if got is None or type(rec) is not dict:
                rep.problems.append(f"{name}:{lineno}: not a sealed record (the line was changed)")
                broken += 1  # (still a line the file holds: its close record counts it)
                chain = None
                continue
            body, h = got
            count += 1
            t = rec.get("t")
            if lineno == 1:
                if t != "file":
                    rep.problems.append(f"{name}:1: does not begin with its file record")
                else:
                    if rec.get("alg") == "hmac-sha256" and key is None:
                        if ("missing", rec.get("key_id")) not in told_keys:
                            told_keys.add(("missing", rec.get("key_id")))
                            rep.problems.append(f"{name}: chained with an HMAC key (key_id {rec.get('key_id')}): "
                                                "give it with --key-file or --key-env")
                        unchecked = True
                        break
                    if key is not None and rec.get("key_id") != key_id(key):
                        if ("other", rec.get("key_id")) not in told_keys:
                            told_keys.add(("other", rec.get("key_id")))
                            rep.problems.append(f"{name}: chained with another key (key_id "
                                                f"{rec.get('key_id') or 'none'}, given {key_id(key)})")
                        unchecked = True
                        break
                    if rec.get("seq") != f.seq:
                        rep.problems.append(f"{name}:1: its file record says sequence {rec.get('seq')} (file renamed)")
                    start = str(rec.get("prev", "")).encode()
                    if prev_h is not None and start != prev_h and not seq_gap:
                        rep.problems.append(f"{name}:1: chain broken between files: it starts from {start[:12].decode()}… "
                                            f"but {prev_name} ends with {prev_h[:12].decode()}… (records removed at "
                                            "the end of that file, or a file replaced)")
                    elif prev_h is None and idx == 0:
                        if f.seq == 1 and start != GENESIS:
                            rep.problems.append(f"{name}:1: the first file does not start the chain")
                        elif f.seq != 1:
                            rep.notes.append(f"recordings start at file {f.seq} ({name}): older files were removed")
                    chain = start
            elif lineno == 2:
                second_type = t
            if chain is not None and link(chain, body, key) != h:
                if not broken:
                    rep.problems.append(f"{name}:{lineno}: hash does not match: this record was changed, or one "
                                        "was removed or inserted before it")
                broken += 1
            chain = h
            last_type = t
            if t == "retention":
                for n in rec.get("removed") or ():
                    mt = NAME.match(str(n))
                    if mt:
                        retained.add(int(mt.group(1)))
            elif t == "gap":
                rep.notes.append(f"{name}:{lineno}: {rec.get('lost')} record(s) were not written ({rec.get('reason')})")
            elif t == "close":
                close_rec = rec
        if unchecked:
            # its records were not read: neither its end (close record, cut tail) nor its chain
            # can be judged, and the file after it is not compared with it
            rep.records += len(lines)
            unchecked_files += 1
            prev_h, prev_name, prev_seq = None, name, f.seq
            continue
        if broken > 1:
            rep.problems.append(f"{name}: {broken} records in all do not match")
        if pending_unclosed is not None:
            if second_type == "gap":
                rep.notes.append(f"{pending_unclosed}: ends without its close record after a write failure "
                                 f"(the gap record in {name} counts what was lost)")
            else:
                rep.problems.append(f"{pending_unclosed}: truncated tail: the file ends without its close record")
            pending_unclosed = None
        rep.records += count
        if cut:
            rep.problems.append(f"{name}: truncated tail: {cut}")
        elif last_type != "close":
            if newest and f.is_open:
                rep.notes.append(f"{name}: open (being written)")
            else:
                pending_unclosed = name
        elif close_rec is not None:
            if close_rec.get("records") != count + broken - 1:
                rep.problems.append(f"{name}: its close record counts {close_rec.get('records')} records, "
                                    f"the file holds {count + broken - 1}")
            if close_rec.get("reason") == "recovered":
                extra = f", {close_rec['cut_bytes']} bytes of a cut-off record removed" if close_rec.get("cut_bytes") else ""
                rep.notes.append(f"{name}: the gateway stopped without closing it; closed at the next start{extra}")
        prev_h, prev_name, prev_seq = chain, name, f.seq
    if pending_unclosed is not None:
        rep.problems.append(f"{pending_unclosed}: truncated tail: the file ends without its close record")
    if unchecked_files:
        rep.notes.append(f"{unchecked_files} file(s) not checked: chained with a key not given")
    for lo, hi, before, after in gaps:
        missing = [s for s in range(lo, hi + 1) if s not in retained]
        if missing:
            which = f"{missing[0]}" if len(missing) == 1 else f"{missing[0]}-{missing[-1]}"
            rep.problems.append(f"file(s) {which} missing between {before} and {after} (deleted)")
    return rep

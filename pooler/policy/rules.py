"""Starlark rule files: loading, compiling, evaluating, combining decisions. No I/O at
evaluation time (rules cannot ``load()`` or open anything); loading reads the files once.

Rules this module keeps:
- One frozen Starlark module per rule file per rules version, and one frozen entry module that
  ``load()``s every file's ``on_statement``: one Python->Starlark call (and one JSON decode) per
  statement for the whole rule set.
- Everything that can go wrong in a rule (an exception, garbage returned, recursion, running past
  ``rule_timeout``, a Rust panic) becomes a *deny* naming the file and line: fail closed.
- Across files: any deny wins, then require_approval, then masks (their union), then allow; with
  no opinion at all, ``default_action`` applies.
- A file that sets ``MODE = "shadow"`` is evaluated but never enforced, each such file on its
  own (an entry module per file, so one broken shadow file hides no other's opinion:
  ``evaluate_shadow``); an error in it is a decision marked ``error``, never a refusal.
  ``MODE = "enforce"`` (or no MODE) enforces.
"""

from __future__ import annotations

import hashlib
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import starlark as sl

ACTIONS = ("allow", "deny", "require_approval", "mask")

_PRELUDE = '''
def allow():
    return {"pooler_action": "allow"}

def deny(reason):
    if type(reason) != "string" or not reason:
        fail("deny() needs a non-empty reason string")
    return {"pooler_action": "deny", "reason": reason}

def require_approval(reason, justification = False, preview = False):
    if type(reason) != "string" or not reason:
        fail("require_approval() needs a non-empty reason string")
    if type(justification) != "bool":
        fail("require_approval(justification = ...) must be True or False")
    if type(preview) != "bool":
        fail("require_approval(preview = ...) must be True or False")
    return {"pooler_action": "require_approval", "reason": reason, "justification": justification,
            "preview": preview}

def mask(columns, reason = ""):
    if type(columns) != "dict" or not columns:
        fail("mask() needs a dict like {\\"public.customers.email\\": \\"email\\"}")
    for k, v in columns.items():
        if type(k) != "string" or type(v) != "string":
            fail("mask() keys and methods must be strings")
    return {"pooler_action": "mask", "columns": columns, "reason": reason}
'''

# the entry module: {loads} and {calls} are filled in per rule set
_ENTRY = '''{loads}

def __pooler_struct(x):
    # facts hold dicts (stmt, copy, inner) and lists of scalars only
    return struct(**{{k: (__pooler_struct(v) if type(v) == "dict" else v) for k, v in x.items()}})

def pooler_entry(both_json):
    # one JSON text back: starlark-pyo3 turns a returned list into Python values one by one
    # (~10 us for five opinions, ~1 us as text); an opinion json.encode cannot write (a function)
    # fails here, in <pooler>, and the caller then runs the files one by one to name it.
    # One text argument: starlark-pyo3 converts each argument through JSON (~1 us a call
    # plus ~2.8 us a KB), so statement and session come as one [stmt, session] list
    both = json.decode(both_json)
    stmt = __pooler_struct(both[0])
    session = __pooler_struct(both[1])
    return json.encode([{calls}])
'''

_GLOBALS = sl.Globals.extended_by([
    sl.LibraryExtension.StructType, sl.LibraryExtension.Json, sl.LibraryExtension.Map,
    sl.LibraryExtension.Filter, sl.LibraryExtension.Typing,
])
_PRELUDE_AST = sl.parse("<pooler builtins>", _PRELUDE)

# Fields whose values depend on SQL literals. A rule set that never names them (or getattr/dir,
# or str/repr/json/format, which turn a whole stmt into text that holds them) decides the same
# for every statement of one shape, so decisions may be cached per shape. What such a rule set
# judges is the shape: engine.Policy.decide hands it the statement with its constants replaced
# ($1, $2, ...; as written only where the facts depend on them: SET, COPY, EXECUTE, ...), so a
# way to read them this scan does not catch ("%s" % stmt) sees the same text in the gateway as
# in the bundle's tests (bundle.py decides them the same way), never another statement's.
_LITERAL_FIELDS = re.compile(r"\b(sql|params|set_value|getattr|dir|str|repr|json|format)\b")


class RuleLoadError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # allow | deny | require_approval | mask
    reason: str = ""
    rule: str = ""  # the file that decided ("" for default_action)
    masks: tuple[tuple[str, str], ...] = ()  # (column pattern, method)
    justification: bool = False  # require_approval(justification=True): refused at once without one
    preview: bool = False  # require_approval(preview=True): reviewers see a dry run's changed rows
    error: bool = False  # the rule failed (a refusal for enforced rules; counted, never enforced, in shadow)

    @property
    def refused(self) -> bool:
        """Refused before it runs (a mask decision runs, with its results masked)."""
        return self.action == "deny" or self.action == "require_approval"


@dataclass(slots=True)
class RuleFile:
    path: Path
    name: str  # path relative to the rules dir's parent, for messages ("rules/agents.star")
    frozen: object | None
    def_line: int
    mode: str = "enforce"  # MODE = "shadow": decisions computed, counted, audited, never enforced
    solo: object | None = None  # an entry calling this file alone (made when an error must be placed)


@dataclass(slots=True)
class RuleSet:
    directory: Path | None
    files: list[RuleFile]
    default_action: str
    timeout: float
    version: str
    literal_blind: bool
    tests: list[dict] = field(default_factory=list)
    may_mask: bool = False  # some file mentions mask(): masked statements need the catalog
    entry: object | None = None  # frozen module calling every enforced file's on_statement
    entry_files: list[RuleFile] = field(default_factory=list)
    shadow_entries: list[tuple[RuleFile, object]] = field(default_factory=list)  # MODE = "shadow": one entry each

    @property
    def active(self) -> bool:
        return bool(self.files) or self.default_action != "allow"

    @property
    def enforcing(self) -> bool:
        return any(f.mode != "shadow" for f in self.files) or self.default_action != "allow"


def _display_name(path: Path, directory: Path) -> str:
    return f"{directory.name}/{path.relative_to(directory)}"


def _line_of_def(src: str) -> int:
    for i, line in enumerate(src.splitlines(), 1):
        if line.startswith("def on_statement"):
            return i
    return 1


def _deadline_options(seconds: float) -> sl.EvalOptions:
    deadline = time.monotonic() + seconds
    return sl.EvalOptions(check_cancelled=lambda: time.monotonic() > deadline, max_callstack_size=64)


def compile_file(path: Path, directory: Path, timeout: float = 1.0) -> RuleFile:
    name = _display_name(path, directory)
    try:
        src = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RuleLoadError(f"{name}: cannot read: {e}") from None
    try:
        ast = sl.parse(name, src)
        mod = sl.Module()
        sl.eval(mod, _PRELUDE_AST, _GLOBALS)
        sl.eval_with(_deadline_options(timeout), mod, ast, _GLOBALS)
        has_entry = re.search(r"^def on_statement\s*\(", src, re.M) is not None
        mode = mod["MODE"]
        frozen = mod.freeze()
    except sl.StarlarkError as e:
        raise RuleLoadError(f"{name}: {e}") from None
    except BaseException as e:  # PanicException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise RuleLoadError(f"{name}: {type(e).__name__}: {e}") from None
    if mode is None:
        mode = "enforce"
    if mode not in ("enforce", "shadow"):
        raise RuleLoadError(f'{name}: MODE must be "enforce" or "shadow", got {mode!r}')
    return RuleFile(path, name, frozen if has_entry else None, _line_of_def(src), mode)


def compile_rules(directory: Path | None, default_action: str = "allow", timeout: float = 0.05) -> RuleSet:
    """Compile every ``*.star`` file of ``directory`` (sorted by name) and read the rule tests
    beside them (``*.test.toml``; policy.bundle runs them). Raises RuleLoadError naming the file
    on any problem."""
    files: list[RuleFile] = []
    digest = hashlib.sha256(default_action.encode())
    literal_blind = True
    may_mask = False
    tests: list[dict] = []
    if directory is not None:
        if not directory.is_dir():
            raise RuleLoadError(f"rules_dir {directory} is not a directory")
        for path in sorted(directory.rglob("*.star")):
            src = path.read_bytes()
            digest.update(str(path.relative_to(directory)).encode() + b"\0" + src)
            text = src.decode("utf-8", "replace")
            if _LITERAL_FIELDS.search(text):
                literal_blind = False
            rf = compile_file(path, directory)
            if rf.mode == "enforce" and re.search(r"\bmask\b", text):
                may_mask = True  # (shadow files see the facts the enforced ones get: no catalog of their own)
            files.append(rf)
        for path in sorted(directory.rglob("*.test.toml")):
            name = _display_name(path, directory)
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise RuleLoadError(f"{name}: {e}") from None
            for i, case in enumerate(data.get("test", []), 1):
                if not isinstance(case, dict) or "sql" not in case or "expect" not in case:
                    raise RuleLoadError(f"{name}: test #{i} needs at least sql and expect")
                if case["expect"] not in ACTIONS:
                    raise RuleLoadError(f"{name}: test #{i}: expect must be one of {', '.join(ACTIONS)}")
                tests.append(dict(case, _file=name, _index=i))
    rs = RuleSet(directory, files, default_action, timeout, digest.hexdigest()[:16], literal_blind, tests, may_mask)
    rs.entry_files = [rf for rf in files if rf.frozen is not None and rf.mode == "enforce"]
    if rs.entry_files:
        rs.entry = _build_entry(rs.entry_files)
    rs.shadow_entries = [(rf, _build_entry([rf])) for rf in files if rf.frozen is not None and rf.mode == "shadow"]
    return rs


def _build_entry(files: list[RuleFile]):
    by_name = {rf.name: rf.frozen for rf in files}
    loads = "\n".join(f'load({orjson.dumps(rf.name).decode()}, __pooler_rule_{i}="on_statement")'
                      for i, rf in enumerate(files))
    calls = ", ".join(f"__pooler_rule_{i}(stmt, session)" for i in range(len(files)))
    mod = sl.Module()
    try:
        sl.eval(mod, sl.parse("<pooler>", _ENTRY.format(loads=loads, calls=calls)), _GLOBALS,
                sl.FileLoader(lambda name: by_name[name]))
    except sl.StarlarkError as e:
        raise RuleLoadError(f"cannot link the rule files: {e}") from None
    return mod.freeze()


def _parse_result(rf: RuleFile, result) -> Decision | None:
    where = f"{rf.name}:{rf.def_line}"
    if result is None:
        return None
    if not isinstance(result, dict) or "pooler_action" not in result:
        return Decision("deny", f"rule error: on_statement returned {str(result)[:80]!r}; expected None, "
                        "allow(), deny(reason), require_approval(reason) or mask({...})", where, error=True)
    action = result["pooler_action"]
    reason = result.get("reason") or ""
    if action not in ACTIONS or not isinstance(reason, str):
        # fail closed: an action nobody knows (or a reason that is not text) is no opinion to skip
        return Decision("deny", f"rule error: on_statement returned action {str(action)[:40]!r} "
                        f"(expected one of {', '.join(ACTIONS)})" if action not in ACTIONS
                        else "rule error: the reason is not a string", where, error=True)
    if action == "mask":
        from ..masking.methods import MethodError, parse_method

        cols = result.get("columns") or {}
        if not isinstance(cols, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cols.items()):
            return Decision("deny", "rule error: mask() takes a dict of \"schema.table.column\": \"method\"",
                            where, error=True)
        for col, spec in cols.items():
            try:
                parse_method(spec)
            except MethodError as e:
                return Decision("deny", f"rule error: mask() of {col}: {e}", where, error=True)
            if col.count(".") > 2 or not col or any(not part for part in col.split(".")):
                return Decision("deny", f"rule error: mask() key {col!r} is not schema.table.column "
                                "(parts may be *)", where, error=True)
        return Decision("mask", reason, rf.name, tuple(sorted(cols.items())))
    if action == "require_approval":
        return Decision(action, reason, rf.name, (), bool(result.get("justification")), bool(result.get("preview")))
    return Decision(action, reason, rf.name)


def evaluate(rs: RuleSet, stmt: dict, session: dict) -> Decision:
    """Run every enforced rule file on one statement and combine their opinions."""
    if rs.entry is None:
        return combine([], rs.default_action)
    got = _run(rs.entry, rs.entry_files, rs.timeout, _both_json(stmt, session))
    if isinstance(got, Decision):
        return got
    decisions: list[Decision] = []
    for d in got:
        if d.action == "deny":
            return d
        decisions.append(d)
    return combine(decisions, rs.default_action)


def evaluate_shadow(rs: RuleSet, stmt: dict, session: dict) -> list[Decision | None]:
    """Each shadow file's opinion of one statement (None: it has none), in file order. A failing
    shadow rule gives a Decision with ``error`` set: the caller counts it, never enforces it."""
    both = _both_json(stmt, session)
    out: list[Decision | None] = []
    for rf, entry in rs.shadow_entries:
        got = _run(entry, [rf], rs.timeout, both)
        out.append(got if isinstance(got, Decision) else (got[0] if got else None))
    return out


def _both_json(stmt: dict, session: dict) -> str:
    return orjson.dumps((stmt, session)).decode()


def _run(entry, files: list[RuleFile], timeout: float, both: str) -> list[Decision] | Decision:
    """Call one entry module: every file's opinion (None left out), or the error Decision."""
    try:
        results = orjson.loads(entry.call_with(_deadline_options(timeout), "pooler_entry", both).value)
    except sl.StarlarkError as e:
        msg = str(e)
        if "--> <pooler>:" in msg and len(files) > 1 and "cancel" not in msg.lower():
            # (a timeout that struck in <pooler> code is one: running the files again would
            # spend a rule_timeout on each)
            return _unwritable(files, timeout, both, e)
        return _error_decision(e, files, timeout)
    except BaseException as e:  # noqa: BLE001 - a panic in the interpreter is a refusal too
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return Decision("deny", f"rule error: {type(e).__name__}", f"{files[0].name}:{files[0].def_line}", error=True)
    out = []
    for rf, result in zip(files, results):
        d = _parse_result(rf, result)
        if d is not None:
            out.append(d)
    return out


def _error_decision(e: sl.StarlarkError, files: list[RuleFile], timeout: float) -> Decision:
    msg = str(e)
    names = {rf.name for rf in files}
    loc = re.search(r"--> (\S+):(\d+):\d+", msg)
    if loc and loc.group(1) in names:
        where = f"{loc.group(1)}:{loc.group(2)}"
    else:
        where = _frame_of(msg, files) or f"{files[0].name}:{files[0].def_line}"
    if "cancel" in msg.lower():
        return Decision("deny", f"rule error: exceeded rule_timeout ({timeout * 1000:.0f} ms)", where, error=True)
    err = next((ln.strip() for ln in msg.splitlines() if ln.startswith("error:")), msg.splitlines()[-1] if msg else "error")
    err = err.removeprefix("error: ")
    if "--> <pooler>:" in msg:  # the entry could not write an opinion as JSON
        err = f"on_statement returned a value that is no decision ({err})"
    return Decision("deny", f"rule error: {err}", where, error=True)


def _unwritable(files: list[RuleFile], timeout: float, both: str, e: sl.StarlarkError) -> Decision:
    """Some file returned what the entry could not write as JSON: run the files one by one (an
    entry each, made on first need) until one fails, and refuse naming it."""
    for rf in files:
        if rf.solo is None:
            rf.solo = _build_entry([rf])
        got = _run(rf.solo, [rf], timeout, both)
        if isinstance(got, Decision):
            return got
    return _error_decision(e, files, timeout)  # none failed alone: still a refusal


def _frame_of(msg: str, files: list[RuleFile]) -> str | None:
    """The innermost rule-file frame of a Starlark traceback ("* rules/x.star:7, in f")."""
    found = None
    for m in re.finditer(r"\* (\S+?):(\d+), in ", msg):
        if any(m.group(1) == rf.name for rf in files):
            found = f"{m.group(1)}:{m.group(2)}"
    return found


def combine(decisions: list[Decision], default_action: str) -> Decision:
    for d in decisions:
        if d.action == "deny":
            return d
    masks = [d for d in decisions if d.action == "mask"]
    merged: dict[str, str] = {}
    for d in masks:
        for col, method in d.masks:
            merged.setdefault(col, method)
    for d in decisions:
        if d.action == "require_approval":
            # once approved the statement runs with the masks the other rules ask for
            held = [x for x in decisions if x.action == "require_approval"]
            return Decision(d.action, d.reason, d.rule, tuple(sorted(merged.items())),
                            any(x.justification for x in held), any(x.preview for x in held))
    if masks:
        rules = ", ".join(sorted({d.rule for d in masks}))
        return Decision("mask", "; ".join(d.reason for d in masks if d.reason), rules, tuple(sorted(merged.items())))
    for d in decisions:
        if d.action == "allow":
            return d
    if default_action == "deny":
        return Decision("deny", "no rule allowed this statement (default_action = deny)", "")
    return Decision("allow", "", "")

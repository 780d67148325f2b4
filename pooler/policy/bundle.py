"""A rule bundle as the gateway and ``pooler rules`` load it: the compiled rule files
(rules.py) and the tests shipped beside them (``*.test.toml``), run through the same Policy
that judges live statements (engine.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .engine import Policy, SessionInfo
from .rules import Decision, RuleLoadError, RuleSet, compile_rules


def load_rules(directory: Path | None, default_action: str = "allow", timeout: float = 0.05,
               run_tests: bool = True) -> RuleSet:
    """Compile the rule files of ``directory`` and, unless ``run_tests`` is false, run their
    tests: a bundle whose tests fail is refused (RuleLoadError naming the first failure)."""
    rs = compile_rules(directory, default_action, timeout)
    if run_tests and rs.tests:
        failures = [r for r in run_rule_tests(rs) if not r.ok]
        if failures:
            f = failures[0]
            raise RuleLoadError(f"{len(failures)} rule test(s) failed; first: {f.describe()}")
    return rs


@dataclass(slots=True)
class TestResult:
    case: dict
    ok: bool
    got: Decision | None
    message: str

    def describe(self) -> str:
        name = self.case.get("name") or self.case["sql"][:60]
        return f"{self.case['_file']} test #{self.case['_index']} ({name}): {self.message}"


def run_rule_tests(rules: RuleSet) -> list[TestResult]:
    policy = Policy(rules)
    results = []
    for case in rules.tests:
        s = case.get("session", {}) or {}
        session = SessionInfo(
            user=str(s.get("user", "agent")), database=str(s.get("database", "postgres")),
            groups=tuple(s.get("groups", ())), application_name=str(s.get("application_name", "")),
            client_addr=str(s.get("client_addr", "127.0.0.1")), in_transaction=bool(s.get("in_transaction", False)),
            search_path=tuple(s.get("search_path", ("public",))))
        v = policy.decide(case["sql"], session)  # the gateway's way: for a literal-blind set, by shape
        d = v.decision
        problems = []
        if d.action != case["expect"]:
            problems.append(f"expected {case['expect']}, got {d.action}" + (f" ({d.rule}: {d.reason})" if d.reason else ""))
        want_reason = case.get("reason")
        if want_reason and want_reason not in d.reason:
            problems.append(f"reason {d.reason!r} does not contain {want_reason!r}")
        want_masks = case.get("masks")
        if want_masks:
            got = dict(d.masks)
            for col, method in want_masks.items():
                if got.get(col) != method:
                    problems.append(f"expected mask {col} = {method}, got {got.get(col)}")
        results.append(TestResult(case, not problems, d, "; ".join(problems) or "ok"))
    return results

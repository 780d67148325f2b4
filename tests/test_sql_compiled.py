"""The compiled analysis (setup.py compiles pooler/sql/analyzer.py and lineage.py with Cython,
the same files, no second source) reads every statement as the .py files read it: the same
facts and the same lineage, field by field, and the same errors, over the SQL of the analyzer's
and lineage's own tests, generated statements over the demo schema, SQL-ish noise and statements
nested too deeply to read. And a binary whose .py has changed since it was built is never run."""

from __future__ import annotations

import ast
import dataclasses
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pooler.sql
from pooler.sql import analyzer as compiled_analyzer
from pooler.sql import lineage as compiled_lineage

from .test_analyzer_properties import SQLISH, TABLES, statement

pytestmark = pytest.mark.skipif(bool(os.environ.get("POOLER_PURE_PYTHON")),
                                reason="POOLER_PURE_PYTHON=1: the compiled modules are not loaded")

HERE = Path(__file__).resolve().parent
SQL_DIR = Path(pooler.sql.__file__).resolve().parent


def _source_module(name: str, dependencies: dict):
    """pooler/sql/<name>.py executed from its source under another name (its relative imports
    of the modules in ``dependencies`` bound to those)."""
    full = f"pooler.sql._source_{name}"
    path = SQL_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(full, path, loader=importlib.machinery.SourceFileLoader(full, str(path)))
    module = importlib.util.module_from_spec(spec)
    saved = {k: sys.modules.get(f"pooler.sql.{k}") for k in dependencies}
    sys.modules.update({f"pooler.sql.{k}": v for k, v in dependencies.items()})
    sys.modules[full] = module  # (dataclasses look their module up while the class is made)
    try:
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            sys.modules[f"pooler.sql.{k}"] = v
    return module


source_analyzer = _source_module("analyzer", {})
source_lineage = _source_module("lineage", {"analyzer": source_analyzer})


def canonical(x):
    """A value with the classes of either module's instances replaced by their names and fields."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__,) + tuple((f.name, canonical(getattr(x, f.name))) for f in dataclasses.fields(x))
    if isinstance(x, (list, tuple)):
        return type(x).__name__, tuple(canonical(i) for i in x)
    if isinstance(x, frozenset):
        return "frozenset", tuple(sorted(map(repr, x)))
    if isinstance(x, dict):
        return "dict", tuple((k, canonical(v)) for k, v in x.items())
    return x


def outcome(fn, *args):
    try:
        return "value", canonical(fn(*args))
    except Exception as e:  # noqa: BLE001 - the error itself is what is compared
        return "error", type(e).__name__, str(e), getattr(e, "position", None)


def columns_of(q: str):
    return TABLES.get(q.removeprefix("public."))


def same_reading(sql: str) -> None:
    for path in (("public",), ("crm", "public"), ()):
        assert outcome(compiled_analyzer.analyze, sql, path) == outcome(source_analyzer.analyze, sql, path), sql
    assert (outcome(compiled_lineage.statement_lineage, sql, ("public",), columns_of)
            == outcome(source_lineage.statement_lineage, sql, ("public",), columns_of)), sql


def _strings_of_tests() -> list[str]:
    out: list[str] = []
    for name in ("test_analyzer.py", "test_lineage.py", "test_sql_reading.py", "test_read_only_as_postgresql_means_it.py",
                 "test_classifier_bypasses.py", "test_rules_unit.py"):
        tree = ast.parse((HERE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) >= 6:
                out.append(node.value)
    return sorted(set(out))


TEST_STRINGS = _strings_of_tests()


def test_the_compiled_analysis_is_built_and_used():
    assert pooler.sql.compiled == ["analyzer", "lineage"], (
        "pooler/sql/analyzer.py and lineage.py are not compiled (./dev.sh setup, or pip install -e .)")
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert compiled_analyzer.__file__.endswith(suffixes) and compiled_lineage.__file__.endswith(suffixes)
    assert source_analyzer.__file__.endswith(".py")


def test_the_statements_of_the_sql_tests_are_read_alike():
    # the strings of those tests: statements of every kind the analysis knows, and the text
    # around them (which mostly does not parse: the errors must be the same errors)
    assert len(TEST_STRINGS) > 500
    for sql in TEST_STRINGS:
        same_reading(sql)


@pytest.mark.parametrize("sql", [
    "SELECT 1" + " + 1" * 600,
    "SELECT " + "ARRAY[" * 600 + "1" + "]" * 600,
    "SELECT * FROM " + "(SELECT * FROM " * 300 + "t" + ") s" * 300,
    "SELECT * FROM " + "(SELECT * FROM " * 120 + "customers" + ") s" * 120,
    "SELECT " + "coalesce(" * 200 + "email" + ")" * 200 + " FROM customers",
])
def test_statements_nested_deeply_are_read_alike(sql):
    same_reading(sql)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.one_of(statement().map(lambda g: g[0]), SQLISH, st.text(max_size=60)))
def test_generated_statements_and_noise_are_read_alike(sql):
    same_reading(sql)


def test_a_binary_older_than_its_source_is_not_run(tmp_path):
    """An edit (or a checkout) after the build: the .py is imported in the binary's place, with
    a warning, and lineage (still fresh) reads the facts' classes of that same module."""
    shutil.copytree(SQL_DIR.parent, tmp_path / "pooler", ignore=shutil.ignore_patterns("__pycache__"))
    changed = tmp_path / "pooler" / "sql" / "analyzer.py"
    changed.write_text(changed.read_text() + "\nEDITED_AFTER_THE_BUILD = True\n")
    probe = ("import pooler.sql as s, pooler.sql.analyzer as a, pooler.sql.lineage as l; "
             "print(s.compiled, a.__file__.endswith('.py'), hasattr(a, 'EDITED_AFTER_THE_BUILD'), "
             "l.AnalysisError is a.AnalysisError, s.analyzer is a)")
    env = {k: v for k, v in os.environ.items() if k != "POOLER_PURE_PYTHON"}
    got = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["['lineage']", "True", "True", "True", "True"]
    assert "pooler/sql/analyzer.py was changed after it was compiled" in got.stderr

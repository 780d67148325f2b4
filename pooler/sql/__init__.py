"""What a statement means, read as PostgreSQL reads it: pure functions over SQL text (pglast).

- ``lexing``: whether the gateway can read a session's SQL as the server will (encodings,
  standard_conforming_strings) and how to decode it;
- ``analyzer``: SQL text -> ``StatementFacts`` (tables, columns, functions, writes, COPY, SET,
  PREPARE/EXECUTE, ...), what the rules judge;
- ``lineage``: which base columns each output column of a statement comes from, what masking
  follows.
- ``secrets``: what in a statement's text may be a password or a connection string (what a
  recording must not keep).

Nothing here knows rules, masks or sockets; ``policy/`` and ``masking/`` build on it.
"""

import hashlib as _hashlib
import importlib.machinery as _machinery
import importlib.util as _util
import logging as _logging
import os as _os
import sys as _sys
from pathlib import Path as _Path

# ``analyzer`` and ``lineage`` may be compiled (setup.py: Cython compiles these very .py files;
# the cold decision's analysis takes ~0.6 x the time). Python imports a binary before the .py
# beside it, so a binary left from before an edit or a checkout would run old code: where its
# recorded source digest is not the .py's, or POOLER_PURE_PYTHON is set, the .py is imported
# in its place. ``compiled`` names the modules that run compiled.
compiled: list[str] = []


def _import_fresh(name: str) -> None:
    here = _Path(__file__).parent
    source = here / f"{name}.py"
    binary = next((b for b in (here / f"{name}{s}" for s in _machinery.EXTENSION_SUFFIXES) if b.exists()), None)
    if binary is None or not source.exists():
        if binary is not None:
            compiled.append(name)
        return
    pure = bool(_os.environ.get("POOLER_PURE_PYTHON"))
    if not pure:
        try:
            recorded = (binary.parent / (binary.name + ".source-sha256")).read_text().strip()
        except OSError:
            recorded = ""
        if recorded == _hashlib.sha256(source.read_bytes()).hexdigest():
            compiled.append(name)
            return
        _logging.getLogger("pooler").warning(
            "%s was changed after it was compiled: running the Python source (./dev.sh setup rebuilds it)",
            source.relative_to(here.parent.parent))
    spec = _util.spec_from_file_location(f"{__name__}.{name}", source,
                                         loader=_machinery.SourceFileLoader(f"{__name__}.{name}", str(source)))
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules[spec.name]
        raise
    setattr(_sys.modules[__name__], name, module)  # (as an import of the submodule would)


for _name in ("analyzer", "lineage"):  # (lineage imports analyzer: in this order)
    _import_fresh(_name)

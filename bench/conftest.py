"""pytest configuration for the benchmarks in bench/ (not part of the normal test suite:
pyproject's testpaths is ``tests``, so ``pytest`` / ``pytest tests/`` never collect bench/).

Run: .venv/bin/python -m pytest bench/test_policy_bench.py --benchmark-only -p no:cacheprovider
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # so `import pooler` works without PYTHONPATH or an editable install
    sys.path.insert(0, str(REPO))

"""The test tree itself: pytest imports test files by basename (rootdir-prepend, no __init__.py), so two files
with one name anywhere under tests/ stop the whole collection."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).parent


def test_every_test_file_has_a_basename_of_its_own():
    names = Counter(p.name for p in TESTS.rglob("*.py") if p.name != "conftest.py")
    assert [name for name, n in names.items() if n > 1] == []

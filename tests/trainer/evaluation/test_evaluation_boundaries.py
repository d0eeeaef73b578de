"""What evaluation may import: its metrics no torch, and none of it the export package (both use
`tunerun.trainer.weights` and the run's method instead)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tunerun.trainer.evaluation as evaluation


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_no_evaluation_module_imports_export():
    files = sorted(Path(evaluation.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"metrics.py", "generation.py", "loss.py", "records.py", "on_demand.py"}
    for path in files:
        reached = {name for name in imported_modules(path) if name.startswith("tunerun.trainer.export")}
        assert not reached, f"{path.name} imports {reached}"


def test_scoring_runs_without_torch():
    code = ("import sys\nfrom tunerun.trainer.evaluation.metrics import score\n"
            "print(score(['category: billing'], ['Category: Billing.'], ['exact_match', 'f1', 'rouge_l']))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'exact_match': 1.0" in done.stdout

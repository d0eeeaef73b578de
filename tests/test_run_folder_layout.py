"""The run folder has one owner: its file names are spelt in `tunerun.cluster.run_folder` and nowhere else.

Every module of the package is parsed; a string in code (docstrings and comments are prose, and may name files)
that is one of the run folder's names, ends in one, or starts with one of its folders fails the check. The jobs
core (spec, plan, loader, memory…) sits below the run folder, so it imports nothing from `tunerun.cluster`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "cluster", "trainer")
OWNER = REPO / "cluster" / "run_folder.py"
NAMES = ("job.yaml", "run.json", "events.jsonl", "metrics.jsonl", "report.html", "service.json", "manifest.json",
         "data_report.json")
FOLDERS = ("checkpoints/", "eval/", "exports/", "final/", "control/", "data/", "logs/", "slurm/")
JOBS_CORE = ("spec", "loader", "plan", "memory", "metrics", "errors", "tracking", "data_files", "ner_setup")


def _prose(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def spelt_names(source: str) -> list[str]:
    """The run-folder names a module's code spells out."""
    tree = ast.parse(source)
    prose = _prose(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            text = node.value
            if any(text == n or text.endswith("/" + n) for n in NAMES) or text.startswith(FOLDERS):
                found.append(f"line {node.lineno}: {text!r}")
    return found


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py") if p != OWNER)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_owner_spells_a_run_folder_name(path):
    assert spelt_names(path.read_text(encoding="utf-8")) == []


def test_the_check_sees_a_spelt_name_and_ignores_prose():
    source = '"""Reads metrics.jsonl."""\ndef f(run):\n    """The job.yaml."""\n    return run.read_json(f"eval/{x}")\n'
    assert spelt_names(source) == ["line 4: 'eval/'"]
    assert spelt_names('NAME = "metrics.jsonl"\nOTHER = f"{run}/run.json"\n') == [
        "line 1: 'metrics.jsonl'", "line 2: '/run.json'"]


def test_the_owner_spells_them():
    assert len(spelt_names(OWNER.read_text(encoding="utf-8"))) >= len(NAMES)


@pytest.mark.parametrize("module", JOBS_CORE)
def test_the_jobs_core_imports_nothing_from_cluster(module):
    tree = ast.parse((REPO / "jobs" / f"{module}.py").read_text(encoding="utf-8"))
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert [name for name in imported if name.startswith("tunerun.cluster")] == []

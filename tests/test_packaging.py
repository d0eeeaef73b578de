"""What `pip install .` puts in the wheel (the k8s image and any non-editable install) is the whole package.

An editable install finds a subpackage or a template missing from pyproject.toml all the same, so only a
non-editable install would show the gap: in a container, at run time. This compares the tree with the lists.
"""
from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
LISTED = {REPO / folder: name for name, folder in SETUPTOOLS["package-dir"].items()}
NOT_INSTALLED = {"k8s/Dockerfile.dockerignore"}  # read by `docker build` from the repository, never at run time


def test_every_python_package_in_the_tree_is_installed_from_its_folder():
    assert sorted(SETUPTOOLS["packages"]) == sorted(SETUPTOOLS["package-dir"])
    roots = {REPO / p for p in ("jobs", "trainer", "cluster", "slurm", "k8s")}
    packages = {init.parent for root in roots for init in root.rglob("__init__.py")}
    assert sorted(map(str, packages - set(LISTED))) == []


def test_every_data_file_in_a_package_is_in_its_package_data():
    missing = []
    for folder, name in LISTED.items():
        for path in folder.rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            owner = max((f for f in LISTED if path.is_relative_to(f)), key=lambda f: len(f.parts))
            if owner != folder or str(path.relative_to(REPO)) in NOT_INSTALLED:
                continue  # a subpackage's file is checked under that package
            relative = str(path.relative_to(folder))
            if not any(fnmatch.fnmatch(relative, pattern) for pattern in SETUPTOOLS["package-data"].get(name, [])):
                missing.append(f"{name}: {relative}")
    assert missing == []

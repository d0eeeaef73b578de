"""Fixtures shared by every test folder."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (a script folder, not a package) as a module."""
    module_name = f"tunerun_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama and its SentencePiece tokenizer, built offline once per session by
    examples/make_tiny_model.py; load it with the same from_pretrained calls a real model takes."""
    return load_example("make_tiny_model").make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def example_module():
    """``example_module("make_support_data")`` imports that script from examples/."""
    return load_example


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is present (a lent GPU machine) and skip, saying why, everywhere else."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

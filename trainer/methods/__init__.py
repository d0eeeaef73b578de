"""Training methods. Each module answers the same questions: how to load the model, which parameters
train, which engine steps them, and how the final weights are written."""
from __future__ import annotations

from importlib import import_module
from types import ModuleType

METHODS = ("full", "lora", "qlora")


def method_module(kind: str) -> ModuleType:
    """The module for ``kind``; each has ``load_model(job)``, ``make_engine(model, job, total_steps)``
    and ``export(engine, out_dir, tokenizer)``."""
    if kind not in METHODS:
        raise ValueError(f"unknown method {kind!r}")
    return import_module(f"tunerun.trainer.methods.{kind}")

"""Training methods, one module each (`full`, `lora`, `qlora`, `qlora_zero3`), looked up in one registry:
`method_for(job.spec.method)`, or `get_method(kind)` for a kind's own module.

Each module is a `Method`: it answers every question that differs between methods, so the train loop,
evaluation and export ask the method instead of comparing ``job.spec.method.kind`` with a name.
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from tunerun.jobs.plan import ResolvedJob
    from tunerun.jobs.spec import MethodSpec
    from tunerun.trainer.engines import Engine
    from tunerun.trainer.weights import RunWeights

METHODS = ("full", "lora", "qlora")
QUANTIZED = ("qlora",)  # the methods whose base bitsandbytes loads in 4 bits


@runtime_checkable
class Method(Protocol):
    """The contract of a method module (torchtune's checkpointer interface is the model for this)."""

    NAME: str  # what people call it: "LoRA", "QLoRA", "full fine-tuning"
    ADAPTER: bool  # trains adapters on a frozen base (PEFT format, mergeable) rather than every weight
    FINAL_DIR: str  # the folder under final/ that export() writes: "adapter" or "model"
    SHARDED_STATE: bool  # checkpoints hold per-rank shards, which fit only the world size that wrote them

    def load_model(self, job: ResolvedJob) -> torch.nn.Module:
        """The model to train, on this worker's device, with exactly its trainable parameters requiring grad."""

    def make_engine(self, model: torch.nn.Module, job: ResolvedJob, total_steps: int) -> Engine:
        """The engine that steps, evaluates, saves and restores ``model``."""

    def before_eval(self, model: torch.nn.Module) -> None:
        """Called on every rank before each evaluation during training, for what evaluating must not change."""

    def export(self, engine: Engine, out_dir: Path, tokenizer) -> Path:
        """Write the final weights under ``out_dir / FINAL_DIR`` (every rank calls it); returns that folder."""

    def load_trained(self, job: ResolvedJob, weights: RunWeights) -> torch.nn.Module:
        """The model as training evaluated it (for qlora the same 4-bit base), holding ``weights``, on this
        process's device: what `tunerun eval` scores."""

    def merged_model(self, job: ResolvedJob, weights: RunWeights) -> torch.nn.Module:
        """One plain, unquantised Hugging Face model holding the trained ``weights`` (adapters folded into
        the base): what ``export --merge`` and ``--format gguf`` write."""


def get_method(kind: str) -> Method:
    """The method module for ``kind`` (one of METHODS)."""
    if kind not in METHODS:
        raise ValueError(f"unknown method {kind!r}")
    return import_module(f"tunerun.trainer.methods.{kind}")


def skip_quantization_imports(method: MethodSpec) -> None:
    """In a process that serves one job (a Ray Train worker), make bitsandbytes absent unless the method quantizes:
    peft imports it when it is installed, and it imports torch's compiler stack (~2 s of CPU in every worker of
    a LoRA or full fine-tune). peft and transformers then see it as not installed, as their checks ask."""
    if method.kind not in QUANTIZED and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError; find_spec answers None


def method_for(method: MethodSpec) -> Method:
    """The module that trains a resolved job's ``spec.method``: QLoRA with a zero block runs under ZeRO-3."""
    if method.sharded_qlora:
        return import_module("tunerun.trainer.methods.qlora_zero3")
    return get_method(method.kind)

"""QLoRA under DeepSpeed ZeRO-3: the 4-bit base partitioned across every worker, LoRA adapters on top.

Under DDP (`tunerun.trainer.methods.qlora`) each GPU holds the whole 4-bit base: ~35 GB for a 70B model. Here
every packed 4-bit weight is a ZeRO-3 parameter like any other, so a GPU holds 1/N of it and gathers one layer at
a time while it computes. Three things make that work (the recipe of the Answer.AI FSDP+QLoRA work, and of
LLaMA-Factory's and Axolotl's ZeRO-3 QLoRA configs):

* the packed weights are stored in the compute dtype (``bnb_4bit_quant_storage``), the one floating dtype
  DeepSpeed partitions and gathers; a uint8 storage tensor is not a parameter it can shard;
* ``HfDeepSpeedConfig`` is live before ``from_pretrained``, so transformers loads straight into partitions
  (``deepspeed.zero.Init``) and the model never sits whole in one process;
* no ``prepare_model_for_kbit_training``: its fp32 upcast of the norms and embeddings would replace partitioned
  parameters with whole ones. The adapters are cast to the compute dtype instead, and DeepSpeed keeps their fp32
  master weights and Adam states, partitioned too.

Checkpoints hold DeepSpeed's own shards with the frozen base left out (``exclude_frozen_parameters``): the
adapters' 16-bit partitions, their fp32 master weights and optimizer states, the scheduler. They fit only the
world size that wrote them (``SHARDED_STATE``). The exported adapter is gathered from the fp32 master weights;
``--merge`` folds it into the unquantised base reloaded from ``model.path`` (`lora.merge_into_base`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunerun.cluster.run_folder import FINAL
from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer.engines import DeepSpeedEngine, torch_dtype, worker_device
from tunerun.trainer.methods import full, lora, qlora
from tunerun.trainer.methods.qlora import before_eval, keep_4bit_training_layout
from tunerun.trainer.tokenizer import save_tokenizer

if TYPE_CHECKING:
    from tunerun.trainer.weights import RunWeights

__all__ = ["NAME", "ADAPTER", "FINAL_DIR", "SHARDED_STATE", "load_model", "make_engine", "before_eval", "export",
           "load_trained", "merged_model"]

NAME = "QLoRA + ZeRO-3"
ADAPTER = True
FINAL_DIR = lora.FINAL_DIR
SHARDED_STATE = True  # DeepSpeed partitions of the adapters and of their optimizer states


def load_model(job: ResolvedJob) -> torch.nn.Module:
    full.live_deepspeed_config(job)
    spec = job.spec
    base = qlora.load_4bit_base(job, sharded=True, device_map=None)  # zero.Init places each partition
    base.requires_grad_(False)
    if spec.training.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep_4bit_training_layout(base)
    return _adapters_in_compute_dtype(lora.with_reference(lora.add_adapters(base, job), job), job)


def make_engine(model: torch.nn.Module, job: ResolvedJob, total_steps: int) -> DeepSpeedEngine:
    return DeepSpeedEngine(model, job, total_steps, exclude_frozen=True)


def export(engine: DeepSpeedEngine, out_dir: Path, tokenizer) -> Path:
    """The adapter in PEFT format, gathered from DeepSpeed's fp32 master weights (collective: every rank calls
    it); rank 0 writes it."""
    target = out_dir / FINAL_DIR
    adapter = engine.trainable_fp32_state_dict()
    if engine.rank == 0:
        engine.module.save_pretrained(target, state_dict=adapter, safe_serialization=True,
                                      selected_adapters=["default"])  # not a preference run's frozen reference
        save_tokenizer(tokenizer, target)
    return target


def load_trained(job: ResolvedJob, weights: RunWeights) -> torch.nn.Module:
    """In one process, without DeepSpeed: the same 4-bit quantization of the base (the storage dtype only changes
    how the packed bytes are viewed), the adapter in the compute dtype it trained in."""
    model = lora.add_adapters(qlora.load_4bit_base(job, sharded=True, device_map={"": worker_device()}), job)
    load_adapter(model, weights)
    return _adapters_in_compute_dtype(model, job)


def merged_model(job: ResolvedJob, weights: RunWeights) -> torch.nn.Module:
    # Into the base reloaded unquantised, never into the 4-bit weights: see qlora.merged_model.
    return lora.merge_into_base(job, weights, _compute_dtype(job), load=load_adapter)


def load_adapter(peft_model: torch.nn.Module, weights: RunWeights) -> None:
    """final/adapter as PEFT wrote it; a checkpoint's adapter consolidated from every rank's fp32 partitions."""
    if weights.name == FINAL:
        lora.load_adapter(peft_model, weights)
        return
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, value in full.zero_checkpoint_state_dict(weights.folder).items():
            params[name].copy_(value)


def _compute_dtype(job: ResolvedJob) -> torch.dtype:
    return torch_dtype(job.spec.method.quantization.compute_dtype)


def _adapters_in_compute_dtype(model: torch.nn.Module, job: ResolvedJob) -> torch.nn.Module:
    """PEFT keeps adapters in fp32; under ZeRO-3 every parameter of the module is in DeepSpeed's one 16-bit dtype
    (its optimizer holds the fp32 master copies)."""
    dtype = _compute_dtype(job)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    return model

"""LoRA: the base model stays frozen in bf16/fp16/fp32; PEFT low-rank adapters train, replicated with DDP."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunerun.cluster.run_folder import ADAPTER_FILE, FINAL
from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer.engines import DDPEngine, load_trainable, torch_dtype, worker_device
from tunerun.trainer.tokenizer import save_tokenizer

if TYPE_CHECKING:
    from tunerun.trainer.weights import RunWeights

NAME = "LoRA"
ADAPTER = True
FINAL_DIR = "adapter"
SHARDED_STATE = False  # adapters and their optimizer are the same on every DDP rank




def load_model(job: ResolvedJob) -> torch.nn.Module:
    return with_reference(add_adapters(load_base(job), job), job)


def with_reference(model: torch.nn.Module, job: ResolvedJob) -> torch.nn.Module:
    """For an objective that compares with the model before training (dpo) started from ``model.adapter``: that
    adapter again, frozen, beside the trained one (TRL's ``ref_adapter_name``), so no second base sits in memory.
    From fresh adapters the reference is the base alone: the adapters switched off."""
    from tunerun.trainer.objectives import objective_for
    from tunerun.trainer.objectives.dpo import REFERENCE

    if job.spec.model.adapter is None or not objective_for(job.spec).compares_with_reference:
        return model
    model.load_adapter(job.spec.model.adapter, adapter_name=REFERENCE, is_trainable=False)
    model.set_adapter("default")  # the trained adapter stays the active one (and the only one with gradients)
    return model


def load_base(job: ResolvedJob) -> torch.nn.Module:
    """``model.path`` in ``model.dtype``, ready to train: no KV cache, gradient checkpointing when asked."""
    spec = job.spec
    base = AutoModelForCausalLM.from_pretrained(
        spec.model.path, dtype=torch_dtype(spec.model.dtype), trust_remote_code=spec.model.trust_remote_code
    )
    no_kv_cache(base)
    if spec.training.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and with DDP without enable_input_require_grads.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return base


def no_kv_cache(model: torch.nn.Module) -> torch.nn.Module:
    """Training needs no KV cache, and with one transformers will not build the block-diagonal mask that keeps
    packed examples (position_ids restarting at 0) from attending to each other."""
    model.config.use_cache = False
    return model


def add_adapters(base: torch.nn.Module, job: ResolvedJob) -> torch.nn.Module:
    """Fresh LoRA adapters on ``base``, or those of ``model.adapter`` to continue (trainable, PEFT's "default")."""
    if job.spec.model.adapter is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, job.spec.model.adapter, is_trainable=True)
    lora = job.spec.method.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def make_engine(model: torch.nn.Module, job: ResolvedJob, total_steps: int) -> DDPEngine:
    return DDPEngine(model, job, total_steps)


def before_eval(model: torch.nn.Module) -> None:
    """Nothing: evaluating a plain (unquantised) base changes nothing about how it trains afterwards."""


def export(engine: DDPEngine, out_dir: Path, tokenizer) -> Path:
    """The adapter in PEFT format (adapter_config.json + adapter_model.safetensors); rank 0 writes it."""
    target = out_dir / FINAL_DIR
    if engine.rank == 0:
        # the trained adapter only: a preference run's frozen reference is its starting point, not its result
        engine.module.save_pretrained(target, safe_serialization=True, selected_adapters=["default"])
        save_tokenizer(tokenizer, target)
    return target


def load_trained(job: ResolvedJob, weights: RunWeights) -> torch.nn.Module:
    model = load_model(job)
    load_adapter(model, weights)
    return model.to(worker_device())


def merged_model(job: ResolvedJob, weights: RunWeights) -> torch.nn.Module:
    return merge_into_base(job, weights, torch_dtype(job.spec.model.dtype))


def load_adapter(peft_model: torch.nn.Module, weights: RunWeights) -> None:
    """Put the adapter of ``weights`` (final/adapter or a checkpoint) into a PEFT model built by add_adapters."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if weights.name == FINAL:
        set_peft_model_state_dict(peft_model, load_file(str(weights.folder / ADAPTER_FILE)))
    else:  # checkpoints hold the trainable parameters under their live names (…lora_A.default.weight)
        load_trainable(peft_model, weights.folder)


def merge_into_base(job: ResolvedJob, weights: RunWeights, dtype: torch.dtype, load=None) -> torch.nn.Module:
    """The adapter folded into the base reloaded from ``model.path`` in ``dtype``; ``load(peft_model, weights)``
    puts the adapter in (default `load_adapter`)."""
    spec = job.spec.model
    base = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    model = add_adapters(base, job)
    (load or load_adapter)(model, weights)
    return model.merge_and_unload()

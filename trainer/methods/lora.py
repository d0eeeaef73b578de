"""LoRA: the base model stays frozen in bf16/fp16/fp32; PEFT low-rank adapters train, replicated with DDP."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer.engines import DDPEngine, torch_dtype


def load_model(job: ResolvedJob) -> torch.nn.Module:
    spec = job.spec
    base = AutoModelForCausalLM.from_pretrained(
        spec.model.path, dtype=torch_dtype(spec.model.dtype), trust_remote_code=spec.model.trust_remote_code
    )
    no_kv_cache(base)
    if spec.training.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and with DDP without enable_input_require_grads.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return add_adapters(base, job)


def no_kv_cache(model: torch.nn.Module) -> torch.nn.Module:
    """Training needs no KV cache, and with one transformers will not build the block-diagonal mask that keeps
    packed examples (position_ids restarting at 0) from attending to each other."""
    model.config.use_cache = False
    return model


def add_adapters(base: torch.nn.Module, job: ResolvedJob) -> torch.nn.Module:
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


def export(engine: DDPEngine, out_dir: Path, tokenizer) -> Path:
    """The adapter in PEFT format (adapter_config.json + adapter_model.safetensors); rank 0 writes it."""
    target = out_dir / "adapter"
    if engine.rank == 0:
        engine.module.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
    return target

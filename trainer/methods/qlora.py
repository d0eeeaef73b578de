"""QLoRA: the base model loaded 4-bit (bitsandbytes NF4/FP4), LoRA adapters on top, replicated with DDP.

QLoRA is not combined with DeepSpeed ZeRO here (the spec refuses method.zero on qlora); ZeRO-3 sharding of
4-bit weights would need ``bnb_4bit_quant_storage`` equal to the compute dtype.
"""
from __future__ import annotations

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer.engines import torch_dtype, worker_device
from tunerun.trainer.methods.lora import add_adapters, export, make_engine, no_kv_cache

__all__ = ["load_model", "make_engine", "export"]


def load_model(job: ResolvedJob) -> torch.nn.Module:
    spec = job.spec
    quant = spec.method.quantization
    compute_dtype = torch_dtype(quant.compute_dtype)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    base = AutoModelForCausalLM.from_pretrained(
        spec.model.path,
        quantization_config=config,
        dtype=compute_dtype,
        device_map={"": worker_device()},
        trust_remote_code=spec.model.trust_remote_code,
    )
    no_kv_cache(base)
    base = prepare_model_for_kbit_training(
        base,
        use_gradient_checkpointing=spec.training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return add_adapters(base, job)

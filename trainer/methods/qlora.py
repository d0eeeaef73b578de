"""QLoRA: the base model loaded 4-bit (bitsandbytes NF4 or FP4, ``method.quantization``), LoRA adapters on top,
replicated with DDP — the same engine, export and adapter files as LoRA.

``prepare_model_for_kbit_training`` (PEFT) freezes the base, casts its non-quantised weights (norms, embeddings)
to float32 and enables gradient checkpointing when ``training.gradient_checkpointing`` is on.

This is QLoRA without a ``method.zero`` block; with one, `tunerun.trainer.methods.qlora_zero3` partitions the
4-bit base across the workers instead. Both load through `quantization_config`, and both guard against the one
bitsandbytes trap evaluation meets, `keep_4bit_training_layout`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer.engines import torch_dtype, worker_device
from tunerun.trainer.methods import lora
from tunerun.trainer.methods.lora import FINAL_DIR, SHARDED_STATE, add_adapters, export, make_engine, no_kv_cache

if TYPE_CHECKING:
    from tunerun.trainer.weights import RunWeights

__all__ = ["NAME", "ADAPTER", "FINAL_DIR", "SHARDED_STATE", "load_model", "make_engine", "before_eval", "export",
           "load_trained", "merged_model", "quantization_config", "load_4bit_base", "keep_4bit_training_layout"]

NAME = "QLoRA"
ADAPTER = True


def quantization_config(job: ResolvedJob, sharded: bool) -> BitsAndBytesConfig:
    """bitsandbytes' 4-bit settings from ``method.quantization``; ``sharded`` (ZeRO-3) stores the packed weights
    in the compute dtype unless the spec says otherwise (the spec refuses any other storage under ZeRO-3)."""
    quant = job.spec.method.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
        bnb_4bit_quant_storage=_storage_dtype(quant.storage_dtype(sharded)),
    )


def _storage_dtype(name: str) -> torch.dtype:
    return torch.uint8 if name == "uint8" else torch_dtype(name)


def load_4bit_base(job: ResolvedJob, sharded: bool, device_map: dict | None) -> torch.nn.Module:
    """``model.path`` quantized to 4 bits in the compute dtype, without a KV cache (``device_map`` None: ZeRO-3's
    zero.Init places each partition)."""
    spec = job.spec
    base = AutoModelForCausalLM.from_pretrained(
        spec.model.path,
        quantization_config=quantization_config(job, sharded),
        dtype=torch_dtype(spec.method.quantization.compute_dtype),
        device_map=device_map,
        trust_remote_code=spec.model.trust_remote_code,
    )
    return no_kv_cache(base)


def load_model(job: ResolvedJob) -> torch.nn.Module:
    spec = job.spec
    base = load_4bit_base(job, sharded=False, device_map={"": worker_device()})
    base = prepare_model_for_kbit_training(
        base,
        use_gradient_checkpointing=spec.training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return lora.with_reference(add_adapters(base, job), job)


def before_eval(model: torch.nn.Module) -> None:
    keep_4bit_training_layout(model)


def load_trained(job: ResolvedJob, weights: RunWeights) -> torch.nn.Module:
    model = load_model(job)  # bitsandbytes placed the 4-bit base on this process's device already
    lora.load_adapter(model, weights)
    return model


def merged_model(job: ResolvedJob, weights: RunWeights) -> torch.nn.Module:
    # Into a base reloaded unquantised: merging into the 4-bit weights would bake the quantisation error into
    # every layer. The compute dtype is the precision the adapter was trained against.
    return lora.merge_into_base(job, weights, torch_dtype(job.spec.method.quantization.compute_dtype))


def keep_4bit_training_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights when a model that keeps training is evaluated.

    On CPUs with AVX512-BF16, bitsandbytes ≥ 0.49 converts a Linear4bit weight in place to a CPU inference
    layout the first time the layer runs in eval mode without grad, and never converts it back. Training
    afterwards backpropagates through the repacked weight as if it had the plain layout: QLoRA still runs but
    learns from wrong gradients (measured on the tiny ticket task: held-out exact match 0.50 with a step-0
    eval, 0.96 without). The repacking only happens when the layer is not training, so these layers are made
    to always report training mode; they hold no dropout, so nothing else changes. Idempotent.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit) and not getattr(module, "_tunerun_training_layout", False):
            module.register_forward_pre_hook(_report_training)
            module._tunerun_training_layout = True


def _report_training(module, args) -> None:
    module.training = True

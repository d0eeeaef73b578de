"""Full fine-tuning: every weight trains, sharded across workers by DeepSpeed ZeRO stage 2 or 3."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer.engines import DeepSpeedEngine, torch_dtype
from tunerun.trainer.methods.lora import no_kv_cache

# transformers consults a live HfDeepSpeedConfig during from_pretrained: with ZeRO-3 it loads the weights
# straight into partitions (deepspeed.zero.Init), so a 70B model never sits whole in one process.
_live_ds_config: list[HfDeepSpeedConfig] = []


def load_model(job: ResolvedJob) -> torch.nn.Module:
    import deepspeed

    spec = job.spec
    # Adopts the process group Ray Train already set up; DeepSpeed's batch arithmetic needs its world size.
    deepspeed.init_distributed()
    _live_ds_config[:] = [HfDeepSpeedConfig(job.deepspeed)]
    model = AutoModelForCausalLM.from_pretrained(
        spec.model.path, dtype=torch_dtype(spec.model.dtype), trust_remote_code=spec.model.trust_remote_code
    )
    no_kv_cache(model)
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_engine(model: torch.nn.Module, job: ResolvedJob, total_steps: int) -> DeepSpeedEngine:
    return DeepSpeedEngine(model, job, total_steps)


def export(engine: DeepSpeedEngine, out_dir: Path, tokenizer) -> Path:
    """Consolidated weights as safetensors shards, loadable with AutoModelForCausalLM.from_pretrained.

    Every rank must call this: gathering ZeRO-3 partitions is a collective operation.
    """
    target = out_dir / "model"
    state_dict = engine.full_state_dict()
    if engine.rank == 0:
        engine.module.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(target)
    return target

"""Full fine-tuning: every weight trains, under DeepSpeed ZeRO (stage 1, 2 or 3 from `method.zero`; stage 3 shards
the weights themselves across workers)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from tunerun.cluster.run_folder import FINAL
from tunerun.jobs.errors import StorageError
from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer.engines import DEEPSPEED_TAG, DeepSpeedEngine, load_deepspeed_file, torch_dtype, worker_device
from tunerun.trainer.methods.lora import load_base
from tunerun.trainer.tokenizer import save_tokenizer

if TYPE_CHECKING:
    from tunerun.trainer.weights import RunWeights

NAME = "full fine-tuning"
ADAPTER = False
FINAL_DIR = "model"
SHARDED_STATE = True  # ZeRO partitions of weights and optimizer states

# transformers consults a live HfDeepSpeedConfig during from_pretrained: with ZeRO-3 it loads the weights
# straight into partitions (deepspeed.zero.Init), so a 70B model never sits whole in one process.
_live_ds_config: list[HfDeepSpeedConfig] = []


def load_model(job: ResolvedJob) -> torch.nn.Module:
    live_deepspeed_config(job)
    return load_base(job)


def live_deepspeed_config(job: ResolvedJob) -> None:
    """Before ``from_pretrained``: DeepSpeed joins the process group and transformers sees the job's config."""
    import deepspeed

    # Adopts the process group Ray Train already set up; DeepSpeed's batch arithmetic needs its world size.
    deepspeed.init_distributed()
    _live_ds_config[:] = [HfDeepSpeedConfig(job.deepspeed)]


def make_engine(model: torch.nn.Module, job: ResolvedJob, total_steps: int) -> DeepSpeedEngine:
    return DeepSpeedEngine(model, job, total_steps)


def before_eval(model: torch.nn.Module) -> None:
    """Nothing: a plain model evaluates without side effects (ZeRO-3's collective forwards are the engine's
    business, `DeepSpeedEngine.collective_forward`)."""


def export(engine: DeepSpeedEngine, out_dir: Path, tokenizer) -> Path:
    """Consolidated weights as safetensors shards, loadable with AutoModelForCausalLM.from_pretrained.

    Every rank must call this: gathering ZeRO-3 partitions is a collective operation.
    """
    target = out_dir / FINAL_DIR
    state_dict = engine.full_state_dict()
    if engine.rank == 0:
        engine.module.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
        save_tokenizer(tokenizer, target)
    return target


def load_trained(job: ResolvedJob, weights: RunWeights) -> torch.nn.Module:
    return merged_model(job, weights).to(worker_device())


def merged_model(job: ResolvedJob, weights: RunWeights) -> torch.nn.Module:
    """The whole model: final/model as exported, or a checkpoint's ZeRO shards consolidated onto the base."""
    spec = job.spec.model
    dtype = torch_dtype(spec.dtype)
    if weights.name == FINAL:
        return AutoModelForCausalLM.from_pretrained(weights.folder, dtype=dtype,
                                                    trust_remote_code=spec.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    state = {k: v.to(dtype) for k, v in zero_checkpoint_state_dict(weights.folder).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise StorageError(f"{weights.name}: DeepSpeed weights do not fit {spec.path} "
                           f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model


def zero_checkpoint_state_dict(folder: Path) -> dict:
    """Consolidated fp32 weights from a checkpoint's DeepSpeed ZeRO shards (all ranks' partitions, any stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _weights_only_torch_load():
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)


@contextmanager
def _weights_only_torch_load():
    """zero_to_fp32 calls ``torch.load(…, weights_only=False)`` itself; for its duration torch.load is the
    engines' plain-data loader (nothing from a run folder is unpickled freely)."""
    real = torch.load

    def load(f, map_location=None, mmap=None, **_ignored):
        return load_deepspeed_file(f, map_location=map_location, mmap=mmap)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


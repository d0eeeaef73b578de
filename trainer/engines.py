"""Engines step a model: one optimizer step from a list of micro-batches, evaluation, state save/restore.

`DDPEngine` serves LoRA and QLoRA (adapters replicated, gradients all-reduced); `DeepSpeedEngine` serves full
fine-tuning under ZeRO and QLoRA under ZeRO-3 (the frozen 4-bit base partitioned, adapters trained);
`EvalOnlyEngine` holds a model loaded in one process for `tunerun eval`. The train loop and evaluation only see
the `Engine` / `EvalEngine` Protocols below, so they never ask which method runs. What a forward computes (the
loss, the held-out statistics) is the job's `tunerun.trainer.objectives.Objective`: an engine decides where and
how a forward runs (device, train or eval mode, gradients, accumulation), never what it scores.

Training state is written with safetensors / ``torch.save`` of plain tensors and read back with
``weights_only=True``: nothing from a run folder is unpickled freely. The names of the files an engine writes
into a checkpoint folder are defined here, once, for everything that reads them (export, evaluation, tests).
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from tunerun.cluster.run_folder import TRAINABLE
from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer.objectives import Objective, objective_for

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}

# What an engine writes into a checkpoint folder (beside the run folder's PROGRESS and TRAINABLE, and per-rank RNG
# files).
OPTIMIZER = "optimizer.pt"  # DDPEngine: the AdamW state dict, plain tensors
SCHEDULER = "scheduler.json"  # DDPEngine: the LR scheduler state
DEEPSPEED_TAG = "deepspeed"  # DeepSpeedEngine: the tag (subfolder) of DeepSpeed's own ZeRO shards
# The real torch.load: while zero_to_fp32 runs, torch.load itself is swapped for load_deepspeed_file.
_torch_load = torch.load


@runtime_checkable
class EvalEngine(Protocol):
    """What evaluation needs from whatever holds the model."""

    module: torch.nn.Module  # the model itself (PEFT or plain HF), unwrapped: generation runs on it
    device: torch.device
    # True when every forward is a collective (ZeRO-3 gathers each layer's parameters from all ranks): then all
    # ranks must run the same number of forwards, so eval batches and generate calls run in lockstep.
    collective_forward: bool
    objective: Objective  # what the forwards compute

    def eval_batch(self, batch: dict) -> tuple[float, ...]:
        """The objective's held-out sums for one batch (supervised fine-tuning: summed token loss, scored
        tokens), through the training forward."""


@runtime_checkable
class Engine(EvalEngine, Protocol):
    """What the train loop needs: steps, the learning rate, and the state a checkpoint holds."""

    rank: int

    @property
    def lr(self) -> float: ...

    def train_step(self, micro_batches: list[dict]) -> float:
        """One optimizer step over the micro-batches of one accumulation window; returns their mean loss."""

    def save_state(self, folder: Path) -> None:
        """Write weights, optimizer and scheduler state into ``folder`` (every rank calls it)."""

    def load_state(self, folder: Path) -> None:
        """Restore what ``save_state`` wrote: training then continues exactly as it would have."""


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def worker_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _scheduler(optimizer, job: ResolvedJob, total_steps: int):
    training = job.spec.training
    return get_scheduler(SCHEDULERS[training.lr_scheduler], optimizer,
                         num_warmup_steps=int(round(training.warmup_ratio * total_steps)),
                         num_training_steps=total_steps)


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def score_batch(objective: Objective, forward: torch.nn.Module, batch: dict,
                device: torch.device) -> tuple[float, ...]:
    """The objective's held-out sums of ``forward`` (a model, DDP wrapper or DeepSpeed engine) on a batch."""
    forward.eval()
    return objective.score(forward, _move(batch, device))


def load_trainable(module: torch.nn.Module, folder: Path) -> None:
    """Copy a checkpoint's trainable tensors (``TRAINABLE``, live parameter names) into ``module`` in place."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(folder / TRAINABLE)).items():
            params[name].copy_(value)


def load_deepspeed_file(path, map_location=None, mmap=None):
    """``torch.load`` of a file DeepSpeed wrote, as plain data: DeepSpeed's own loaders unpickle freely
    (``weights_only=False``); this allows only the plain-data classes DeepSpeed stores in its states."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2: where each rank's slice of a parameter lies

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        return _torch_load(path, map_location=map_location, mmap=mmap, weights_only=True)


class _Optimizing:
    optimizer: torch.optim.Optimizer

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self.optimizer.param_groups[0]["lr"]


class DDPEngine(_Optimizing):
    """Adapters (LoRA/QLoRA) trained with AdamW; DDP averages gradients when there is more than one worker."""

    collective_forward = False  # DDP synchronises gradients in backward; a forward is local

    def __init__(self, model: torch.nn.Module, job: ResolvedJob, total_steps: int):
        import ray.train.torch

        self.rank = _rank()
        self.device = worker_device()
        self.objective = objective_for(job.spec)
        self.module = model
        self.model = ray.train.torch.prepare_model(model, move_to_device=self.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        training = job.spec.training
        self.max_grad_norm = training.max_grad_norm
        self.optimizer = torch.optim.AdamW(self.trainable, lr=training.learning_rate,
                                           weight_decay=training.weight_decay)
        self.scheduler = _scheduler(self.optimizer, job, total_steps)

    def train_step(self, micro_batches: list[dict]) -> float:
        self.model.train()
        total = 0.0
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Skip the gradient all-reduce on all but the last micro-batch of an accumulation window.
            sync = self.model.no_sync() if (not last and hasattr(self.model, "no_sync")) else nullcontext()
            with sync:
                loss = self.objective.loss(self.model, _move(batch, self.device))
                (loss / len(micro_batches)).backward()
            total += float(loss.detach())
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    def eval_batch(self, batch: dict) -> tuple[float, ...]:
        return score_batch(self.objective, self.model, batch, self.device)

    def save_state(self, folder: Path) -> None:
        """Rank 0 writes adapter weights, optimizer and scheduler (identical on every DDP rank)."""
        if self.rank != 0:
            return
        trainable = {n: p.detach().contiguous().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
        save_file(trainable, str(folder / TRAINABLE))
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER)
        (folder / SCHEDULER).write_text(json.dumps(self.scheduler.state_dict(), default=_no_callables))

    def load_state(self, folder: Path) -> None:
        load_trainable(self.module, folder)
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER, weights_only=True))
        self.scheduler.load_state_dict(json.loads((folder / SCHEDULER).read_text()))


class DeepSpeedEngine(_Optimizing):
    """A model trained under DeepSpeed ZeRO (stage 1, 2 or 3) with the config the planner generated: every weight
    (full fine-tuning), or only the adapters on a frozen base (``exclude_frozen``: QLoRA under ZeRO-3, whose
    checkpoints leave the base out — it is reloaded from model.path, never changed)."""

    def __init__(self, model: torch.nn.Module, job: ResolvedJob, total_steps: int, exclude_frozen: bool = False):
        import deepspeed

        config = json.loads(json.dumps(job.deepspeed))
        if not torch.cuda.is_available():
            # DeepSpeed's default AdamW is FusedAdam, a CUDA kernel; on CPU use torch's AdamW.
            config["optimizer"]["params"]["torch_adam"] = True
            config["zero_force_ds_cpu_optimizer"] = False
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=config,
            lr_scheduler=lambda optimizer: _scheduler(optimizer, job, total_steps),
        )
        self.rank = _rank()
        self.objective = objective_for(job.spec)
        self.module = self.engine.module
        self.device = self.engine.device
        self.zero_stage = config["zero_optimization"]["stage"]
        self.collective_forward = self.zero_stage == 3  # each layer's parameters are gathered from every rank
        self.exclude_frozen = exclude_frozen

    def train_step(self, micro_batches: list[dict]) -> float:
        # DeepSpeed scales the loss by its gradient_accumulation_steps and only updates at the boundary.
        self.engine.train()
        total = 0.0
        for batch in micro_batches:
            loss = self.objective.loss(self.engine, _move(batch, self.device))
            self.engine.backward(loss)
            self.engine.step()
            total += float(loss.detach())
        return total / len(micro_batches)

    def eval_batch(self, batch: dict) -> tuple[float, ...]:
        return score_batch(self.objective, self.engine, batch, self.device)

    def save_state(self, folder: Path) -> None:
        """Every rank writes its own shards (collective)."""
        if not self.exclude_frozen:
            self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)
            return
        # DeepSpeed leaves out frozen *parameters*; a 4-bit layer also puts its quantization constants (absmax,
        # code books: ~1 GB for a 70B model) into the module's state. Neither is needed to resume: both are
        # rebuilt from model.path. Only the trained parameters stay in the module state each rank writes.
        trained = {name for name, p in self.module.named_parameters() if p.requires_grad}

        def trained_only(module, state, prefix, local_metadata):
            for key in [k for k in state if k not in trained]:
                del state[key]

        hook = self.module.register_state_dict_post_hook(trained_only)
        try:
            self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        finally:
            hook.remove()

    def load_state(self, folder: Path) -> None:
        self.engine.checkpoint_engine.load = load_deepspeed_file  # not DeepSpeed's free unpickling
        # Without the frozen base in the checkpoint, the module's state holds only the trained parameters.
        path, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG,
                                              load_module_strict=not self.exclude_frozen)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")

    def trainable_fp32_state_dict(self) -> dict:
        """The trained parameters whole, from the optimizer's fp32 master weights, on rank 0 (collective: each
        rank holds a partition of every one)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                value = safe_get_full_fp32_param(param)
                if self.rank == 0:
                    out[name] = value.detach().cpu().contiguous()
        return out

    def full_state_dict(self) -> dict:
        """The whole model's weights on rank 0 (collective for ZeRO-3, where each rank holds a partition)."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict() if self.rank == 0 else {}


class EvalOnlyEngine:
    """A model loaded in one process to be evaluated (`tunerun eval`): no optimizer, no process group."""

    collective_forward = False

    def __init__(self, model: torch.nn.Module, device: torch.device, objective: Objective):
        self.module = model
        self.device = device
        self.objective = objective

    def eval_batch(self, batch: dict) -> tuple[float, ...]:
        return score_batch(self.objective, self.module, batch, self.device)


def _no_callables(value):
    return None if callable(value) else str(value)

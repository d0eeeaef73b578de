"""Engines step a model: one optimizer step from a list of micro-batches, evaluation, state save/restore.

`DDPEngine` serves LoRA and QLoRA (adapters replicated, gradients all-reduced); `DeepSpeedEngine` serves full
fine-tuning under ZeRO. The train loop only sees their common surface, so it never asks which method runs.
Training state is written with safetensors / ``torch.save`` of plain tensors and read back with
``weights_only=True``: nothing from a run folder is unpickled freely.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from tunerun.jobs.plan import ResolvedJob

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def worker_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _warmup_steps(job: ResolvedJob, total_steps: int) -> int:
    return int(round(job.spec.training.warmup_ratio * total_steps))


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _label_tokens(batch: dict) -> int:
    # Causal LM loss predicts token t+1 from t: the first label of each row is never scored.
    return int((batch["labels"][:, 1:] != -100).sum())


class DDPEngine:
    """Adapters (LoRA/QLoRA) trained with AdamW; DDP averages gradients when there is more than one worker."""

    def __init__(self, model: torch.nn.Module, job: ResolvedJob, total_steps: int):
        import ray.train.torch

        self.rank = _rank()
        self.device = worker_device()
        self.module = model
        self.model = ray.train.torch.prepare_model(model, move_to_device=self.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        training = job.spec.training
        self.max_grad_norm = training.max_grad_norm
        self.optimizer = torch.optim.AdamW(self.trainable, lr=training.learning_rate,
                                           weight_decay=training.weight_decay)
        self.scheduler = get_scheduler(SCHEDULERS[training.lr_scheduler], self.optimizer,
                                       num_warmup_steps=_warmup_steps(job, total_steps),
                                       num_training_steps=total_steps)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: list[dict]) -> float:
        self.model.train()
        total = 0.0
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Skip the gradient all-reduce on all but the last micro-batch of an accumulation window.
            sync = self.model.no_sync() if (not last and hasattr(self.model, "no_sync")) else nullcontext()
            with sync:
                loss = self.model(**_move(batch, self.device)).loss
                (loss / len(micro_batches)).backward()
            total += float(loss.detach())
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    @torch.no_grad()
    def eval_batch(self, batch: dict) -> tuple[float, int]:
        """(summed token loss, scored tokens) for one batch."""
        self.model.eval()
        tokens = _label_tokens(batch)
        loss = self.model(**_move(batch, self.device)).loss
        return float(loss) * tokens, tokens

    def save_state(self, folder: Path) -> None:
        """Rank 0 writes adapter weights, optimizer and scheduler (identical on every DDP rank)."""
        if self.rank != 0:
            return
        trainable = {n: p.detach().contiguous().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
        save_file(trainable, str(folder / "trainable.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        (folder / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict(), default=_no_callables))

    def load_state(self, folder: Path) -> None:
        weights = load_file(str(folder / "trainable.safetensors"))
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))


class DeepSpeedEngine:
    """All weights trained under DeepSpeed ZeRO-2/3 with the config the planner generated."""

    def __init__(self, model: torch.nn.Module, job: ResolvedJob, total_steps: int):
        import deepspeed

        config = json.loads(json.dumps(job.deepspeed))
        if not torch.cuda.is_available():
            # DeepSpeed's default AdamW is FusedAdam, a CUDA kernel; on CPU use torch's AdamW.
            config["optimizer"]["params"]["torch_adam"] = True
            config["zero_force_ds_cpu_optimizer"] = False
        training = job.spec.training

        def scheduler(optimizer):
            return get_scheduler(SCHEDULERS[training.lr_scheduler], optimizer,
                                 num_warmup_steps=_warmup_steps(job, total_steps), num_training_steps=total_steps)

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=config,
            lr_scheduler=scheduler,
        )
        self.rank = _rank()
        self.module = self.engine.module
        self.device = self.engine.device
        self.zero_stage = config["zero_optimization"]["stage"]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: list[dict]) -> float:
        # DeepSpeed scales the loss by its gradient_accumulation_steps and only updates at the boundary.
        self.engine.train()
        total = 0.0
        for batch in micro_batches:
            loss = self.engine(**_move(batch, self.device)).loss
            self.engine.backward(loss)
            self.engine.step()
            total += float(loss.detach())
        return total / len(micro_batches)

    @torch.no_grad()
    def eval_batch(self, batch: dict) -> tuple[float, int]:
        self.engine.eval()
        tokens = _label_tokens(batch)
        loss = self.engine(**_move(batch, self.device)).loss
        return float(loss) * tokens, tokens

    def save_state(self, folder: Path) -> None:
        """Every rank writes its own shards (collective)."""
        self.engine.save_checkpoint(str(folder), tag="deepspeed")

    def load_state(self, folder: Path) -> None:
        # DeepSpeed's own loader unpickles freely (weights_only=False); read its files as plain tensors instead,
        # allowing only the plain-data classes DeepSpeed stores in its optimizer states.
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        def load(path, map_location=None):
            with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
                return torch.load(path, map_location=map_location, weights_only=True)

        self.engine.checkpoint_engine.load = load
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed")
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")

    def full_state_dict(self) -> dict:
        """The whole model's weights on rank 0 (collective for ZeRO-3, where each rank holds a partition)."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict() if self.rank == 0 else {}


def _no_callables(value):
    return None if callable(value) else str(value)

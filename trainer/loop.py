"""The recipe every Ray Train worker runs: setup → (resume) → train → evaluate → checkpoint → export.

Read it top to bottom. Method differences (how the model loads, which engine steps it, what is exported)
live in `tunerun.trainer.methods`; this loop never asks which method it is running.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from tunerun.cluster.storage import RunFolder
from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer import checkpoint as ckpt
from tunerun.trainer.batches import BatchSchedule, eval_shard, load_examples
from tunerun.trainer.data import collate
from tunerun.trainer.methods import method_module
from tunerun.trainer.tokenizer import load_tokenizer


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    # ── setup ───────────────────────────────────────────────────────────────────────────────────────────
    run = RunFolder(config["run_root"], config["run_id"])
    job = ResolvedJob.model_validate(yaml.safe_load(run.read_text("job.yaml")))
    spec = job.spec
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _seed_everything(spec.training.seed + rank)

    tokenizer = load_tokenizer(job)
    train_set = load_examples(run.file("data/train.jsonl"))
    eval_set = load_examples(run.file("data/eval.jsonl"))
    schedule = BatchSchedule(len(train_set), world, spec.training.micro_batch_size, spec.grad_accumulation,
                             spec.training.seed)
    total_steps = spec.training.max_steps or schedule.steps_per_epoch * spec.training.epochs

    method = method_module(spec.method.kind)
    model = method.load_model(job)
    engine = method.make_engine(model, job, total_steps)
    log = _RankZeroLog(run, rank)

    # ── resume from the newest complete checkpoint, if any ──────────────────────────────────────────────
    progress = ckpt.Progress(step=0, epoch=0, tokens_seen=0)
    latest, skipped = ckpt.latest_complete(run.path)
    for note in skipped:
        log.event("checkpoint_skipped", detail=note)
    if latest is not None:
        engine.load_state(latest)
        progress = ckpt.load_progress(latest, rank)
        log.event("resumed", step=progress.step, checkpoint=latest.name)
    elif eval_set:
        log.metrics(step=0, **_evaluate(engine, eval_set, tokenizer, rank, world, spec))

    # ── train ───────────────────────────────────────────────────────────────────────────────────────────
    log.event("training_started", total_steps=total_steps, world_size=world, start_step=progress.step)
    started, start_tokens = time.perf_counter(), progress.tokens_seen
    while progress.step < total_steps:
        ids = schedule.micro_batches(progress.step, rank)
        micro = [collate([train_set[i] for i in batch], tokenizer.pad_token_id) for batch in ids]
        loss = engine.train_step(micro)
        tokens = sum(_tokens_in(b) for b in micro)
        loss, tokens = _all_reduce_mean_and_sum(loss, tokens)
        progress = ckpt.Progress(progress.step + 1, schedule.epoch_of(progress.step), progress.tokens_seen + tokens)
        elapsed = time.perf_counter() - started
        log.metrics(step=progress.step, loss=loss, lr=engine.lr, epoch=progress.epoch,
                    tokens_per_s=(progress.tokens_seen - start_tokens) / max(elapsed, 1e-9),
                    total_steps=total_steps, elapsed_s=elapsed)

        last = progress.step == total_steps
        if eval_set and (progress.step % spec.eval.every_steps == 0 or last):
            log.metrics(step=progress.step, **_evaluate(engine, eval_set, tokenizer, rank, world, spec))
        if progress.step % spec.checkpoint.every_steps == 0 or last:
            _save_checkpoint(engine, progress, run, rank, log)

    # ── export ──────────────────────────────────────────────────────────────────────────────────────────
    target = method.export(engine, run.file("final"), tokenizer)
    _barrier()
    log.event("exported", path=str(target), step=progress.step)


def _evaluate(engine, eval_set, tokenizer, rank, world, spec) -> dict:
    """Held-out loss over the whole eval set, each rank scoring its shard."""
    loss_sum, tokens = 0.0, 0
    shard = eval_shard(len(eval_set), world, rank)
    size = spec.training.micro_batch_size
    for start in range(0, len(shard), size):
        batch = collate([eval_set[i] for i in shard[start:start + size]], tokenizer.pad_token_id)
        batch_loss, batch_tokens = engine.eval_batch(batch)
        loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
    if dist.is_initialized():
        # Ranks with an empty shard still join: ZeRO-3 forward passes are collective too.
        totals = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)
        dist.all_reduce(totals)
        loss_sum, tokens = float(totals[0]), int(totals[1])
    loss = loss_sum / max(tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": float(torch.exp(torch.tensor(min(loss, 50.0))))}


def _save_checkpoint(engine, progress: ckpt.Progress, run: RunFolder, rank: int, log: "_RankZeroLog") -> None:
    import ray.train

    name = ckpt.checkpoint_dir_name(progress.step)
    local = Path(tempfile.mkdtemp(prefix=f"tunerun-rank{rank}-"))
    try:
        engine.save_state(local)
        ckpt.save_progress(local, progress, rank)
        ray.train.report({"step": progress.step}, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=name)
        _barrier()  # every rank's files are persisted before the manifest describes them
        if rank == 0:
            manifest = ckpt.write_manifest(run.file(name), progress.step)
            log.event("checkpoint_saved", step=progress.step, path=name, files=len(manifest["files"]))
        _barrier()
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _tokens_in(batch: dict) -> int:
    """Real (non-padding) tokens; packed batches carry no attention mask because they have no padding."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _all_reduce_mean_and_sum(loss: float, tokens: int) -> tuple[float, int]:
    if not dist.is_initialized():
        return loss, tokens
    values = torch.tensor([loss, float(tokens)], dtype=torch.float64)
    dist.all_reduce(values)
    return float(values[0]) / dist.get_world_size(), int(values[1])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


class _RankZeroLog:
    """Rank 0 writes the run's metrics and events; other ranks stay quiet."""

    def __init__(self, run: RunFolder, rank: int):
        self.run, self.rank = run, rank

    def metrics(self, **values) -> None:
        if self.rank == 0:
            self.run.append_jsonl("metrics.jsonl", {"time": time.time(), **values})

    def event(self, kind: str, **fields) -> None:
        if self.rank == 0:
            self.run.event(kind, **fields)

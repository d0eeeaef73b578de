"""The recipe every Ray Train worker runs: setup → (resume) → train → evaluate → checkpoint → export.

Read it top to bottom. Method differences (how the model loads, which engine steps it, what evaluating must not
change, what is exported) are answered by the `tunerun.trainer.methods.Method` of the job; this loop never asks
which method it is running. What a batch holds and which loss trains on it are the job's
`tunerun.trainer.objectives.Objective`, which the engine carries.
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from tunerun.cluster import space
from tunerun.cluster.run_folder import (DISK_FULL, EVAL_DATA, FINAL, STOPPED, TRAIN_DATA, RunFolder, append_metrics,
                                        checkpoint_name, final_weights, write_manifest)
from tunerun.cluster.runs import disk_full_message
from tunerun.jobs.errors import DiskFullError
from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer import checkpoint as ckpt
from tunerun.trainer.batches import BatchSchedule
from tunerun.trainer.data.pack import load_examples
from tunerun.trainer.inputs import localize_model
from tunerun.trainer.methods import method_for, skip_quantization_imports
from tunerun.trainer.preemption import StopPoll
from tunerun.trainer.tokenizer import load_tokenizer
from tunerun.trainer.tracking import open_worker_trackers


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    # ── setup ───────────────────────────────────────────────────────────────────────────────────────────
    job = localize_model(ResolvedJob.model_validate(config["job"]))  # s3:// models: once per node, cached
    spec = job.spec
    run = RunFolder(spec.storage, job.run_id)
    scratch = Path(tempfile.mkdtemp(prefix="tunerun-worker-"))  # downloads from object storage land here
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _seed_everything(spec.training.seed + rank)

    tokenizer = load_tokenizer(job)
    train_set = load_examples(_fetch(run, TRAIN_DATA, scratch))
    eval_set = load_examples(_fetch(run, EVAL_DATA, scratch))
    schedule = BatchSchedule(len(train_set), world, spec.training.micro_batch_size, spec.grad_accumulation,
                             spec.training.seed)
    total_steps = spec.training.max_steps or schedule.steps_per_epoch * spec.training.epochs

    skip_quantization_imports(spec.method)
    method = method_for(spec.method)
    load_started = time.time()
    model = method.load_model(job)
    model_loaded = time.time()
    engine = method.make_engine(model, job, total_steps)
    objective = engine.objective  # what a batch holds, what it counts and what loss the engine steps on
    log = _RankZeroLog(run, rank, open_worker_trackers(job, run, rank, scratch, warn=_warn))
    log.event("worker_ready", load_started=load_started, model_loaded=model_loaded)  # cold-start breakdown

    # what the objective needs of the model before training (DPO's reference under a full fine-tune): it is still
    # the untrained model here, whether or not a checkpoint is loaded next
    reference = objective.attach_reference(engine, {"train": train_set, "eval": eval_set}, run,
                                           tokenizer.pad_token_id, spec.training.micro_batch_size, untrained=True)
    if reference:
        log.event("reference_ready", **reference)

    # ── resume from the newest complete checkpoint, if any ──────────────────────────────────────────────
    progress = ckpt.Progress(step=0, epoch=0, tokens_seen=0)
    latest, skipped = ckpt.latest_complete(run, scratch / "resume")
    for note in skipped:
        log.event("checkpoint_skipped", detail=note)
    if latest is not None:
        engine.load_state(latest)
        progress = ckpt.load_progress(latest, rank)
        log.event("resumed", step=progress.step, checkpoint=latest.name, world_size=world)
    else:  # the untrained model on the same eval set: the base every later eval is compared with
        _evaluate(engine, method, eval_set, tokenizer, rank, job, run, log, step=0, phase="base")

    # ── train ───────────────────────────────────────────────────────────────────────────────────────────
    log.event("training_started", total_steps=total_steps, world_size=world, start_step=progress.step)
    started, start_tokens = time.perf_counter(), progress.tokens_seen
    stop_poll = StopPoll(run, rank)
    while progress.step < total_steps:
        ids = schedule.micro_batches(progress.step, rank)
        micro = [objective.collate([train_set[i] for i in batch], tokenizer.pad_token_id) for batch in ids]
        loss = engine.train_step(micro)
        tokens = sum(objective.tokens(b) for b in micro)
        loss, tokens = _all_reduce_mean_and_sum(loss, tokens)
        progress = ckpt.Progress(progress.step + 1, schedule.epoch_of(progress.step), progress.tokens_seen + tokens,
                                 world)
        elapsed = time.perf_counter() - started
        log.metrics(step=progress.step, loss=loss, lr=engine.lr, epoch=progress.epoch,
                    tokens_per_s=(progress.tokens_seen - start_tokens) / max(elapsed, 1e-9),
                    tokens_seen=progress.tokens_seen, total_steps=total_steps, elapsed_s=elapsed)

        last = progress.step == total_steps
        measured = {}
        if progress.step % spec.eval.every_steps == 0 or last:
            measured = _evaluate(engine, method, eval_set, tokenizer, rank, job, run, log, step=progress.step,
                                 phase="final" if last else "train")
        stop = stop_poll.requested()
        if progress.step % spec.checkpoint.every_steps == 0 or last or stop:
            if not _save_checkpoint(engine, progress, run, rank, log, spec.checkpoint, measured):
                return  # no room for it: stopped before writing (the driver records the run as disk_full)
        if stop and not last:
            if rank == 0:
                run.write_json(STOPPED, {"step": progress.step, "time": time.time()})
            log.event("stopped_at_checkpoint", step=progress.step)
            log.close()
            return

    # ── export ──────────────────────────────────────────────────────────────────────────────────────────
    local_final = run.local_path(FINAL) if run.is_local else scratch / FINAL
    target = method.export(engine, local_final, tokenizer)
    _barrier()
    if rank == 0 and not run.is_local:
        run.upload_dir(local_final, FINAL)
    log.event("exported", path=run.uri(final_weights(target.name)), step=progress.step)
    log.close()

    # ── memory: the measured peak beside the planner's estimate (memory.json) ───────────────────────────
    from tunerun.trainer.memory_probe import write_memory_report

    write_memory_report(run, job, rank, engine.module)


def _evaluate(engine, method, eval_set, tokenizer, rank, job, run, log, step: int, phase: str) -> dict:
    """Held-out loss, generation metrics, forgetting check and gates (`tunerun.trainer.evaluation.records`) on
    every rank. ``phase``: base (step 0, untrained), train or final. Returns the eval-set metrics by name (loss,
    exact_match, …)."""
    from tunerun.trainer.evaluation.records import evaluate_during_training

    method.before_eval(engine.module)  # qlora: else bitsandbytes repacks 4-bit weights on CPU and QLoRA degrades
    row = evaluate_during_training(engine, tokenizer, eval_set, job, run, step, phase, rank)
    if row:
        log.metrics(step=step, **row)
    return {name[len("eval_"):]: value for name, value in row.items() if name.startswith("eval_")}


def _save_checkpoint(engine, progress: ckpt.Progress, run: RunFolder, rank: int, log: "_RankZeroLog",
                     policy, measured: dict) -> bool:
    """Write the checkpoint of this step; False (on every rank) when it would not fit, having written nothing."""
    if _no_room_for_checkpoint(run, rank, log, progress.step):
        return False
    try:
        _write_checkpoint(engine, progress, run, rank, log, policy, measured)
    except Exception as exc:
        full = space.disk_full_in(exc)
        if full is None:
            raise
        path = space.full_path(full) or run.uri()
        raise DiskFullError(f"no space left on {space.filesystem_of(path) if run.is_local else 'the staging disk'} "
                            f"writing {path} at the checkpoint of step {progress.step}") from None
    return True


def _no_room_for_checkpoint(run: RunFolder, rank: int, log: "_RankZeroLog", step: int) -> bool:
    """Every rank checks the filesystems it writes; if one lacks room, all stop and rank 0 says why."""
    found = ckpt.space_shortage(run, Path(tempfile.gettempdir()))
    shortages = [s for s in _gather(found.describe() if found else None) if s]
    if not shortages:
        return False
    if rank == 0:
        what = f"{shortages[0]}; stopped before the checkpoint of step {step}"
        run.write_json(DISK_FULL, {"step": step, "message": disk_full_message(run, what), "time": time.time()})
        log.event("disk_full", step=step, detail=shortages[0])
        log.flush()
    return True


def _write_checkpoint(engine, progress: ckpt.Progress, run: RunFolder, rank: int, log: "_RankZeroLog",
                      policy, measured: dict) -> None:
    import ray.train

    name = checkpoint_name(progress.step)
    local = Path(tempfile.mkdtemp(prefix=f"tunerun-rank{rank}-"))
    try:
        engine.save_state(local)
        ckpt.save_progress(local, progress, rank)
        upload = ckpt.uploader(run)  # object storage: hashes each file in the read that uploads it
        with ThreadPoolExecutor(1) as hasher:  # a filesystem: from the local files, beside Ray's copy
            hashing = None if upload else hasher.submit(ckpt.file_digests, local)
            ray.train.report({"step": progress.step}, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                             checkpoint_dir_name=name, checkpoint_upload_fn=upload)
            digests = upload.digests if upload else hashing.result()
        every_rank = _gather(digests)  # also the barrier: all ranks' files are persisted
        if rank == 0:
            merged = {path: entry for part in every_rank for path, entry in part.items()}
            manifest = write_manifest(run, name, progress.step, merged, measured)
            removed = ckpt.remove_incomplete(run, progress.step)
            retired, best = ckpt.apply_retention(run, policy)
            log.event("checkpoint_saved", step=progress.step, path=name, files=len(manifest["files"]),
                      removed_incomplete=removed, removed_by_policy=retired,
                      **({"best": best} if best else {}))
            log.flush()
        _barrier()
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _fetch(run: RunFolder, name: str, scratch: Path) -> Path:
    """A local path for a run-folder file: in place on a shared filesystem, downloaded from object storage."""
    if run.is_local:
        return run.local_path(name)
    if not run.exists(name):
        return scratch / "absent" / name
    return run.download(name, scratch / name)


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
    # No PYTHONHASHSEED here: str hashing is fixed when an interpreter starts, so setting it now changes nothing.
    random.seed(seed)
    torch.manual_seed(seed)


def _warn(message: str) -> None:
    print(f"warning: {message}", flush=True)  # Ray forwards worker output to the driver log


class _RankZeroLog:
    """Rank 0 writes the run's metrics and events, and mirrors the metrics to the trackers; other ranks stay quiet."""

    def __init__(self, run: RunFolder, rank: int, trackers):
        self.run, self.rank, self.trackers = run, rank, trackers

    def metrics(self, **values) -> None:
        if self.rank == 0:
            append_metrics(self.run, {"time": time.time(), **values})
            self.trackers.log_row(values["step"], values)

    def event(self, kind: str, **fields) -> None:
        if self.rank == 0:
            self.run.event(kind, **fields)

    def flush(self) -> None:
        if self.rank == 0:
            self.run.flush()
            self.trackers.flush()

    def close(self) -> None:
        """The end of this launch's training: flushed, the trackers' pending updates sent (or given up)."""
        self.flush()
        self.trackers.close()

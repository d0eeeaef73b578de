"""A run folder, seen as OpenAI's objects: the fine-tuning job, its events, its checkpoints, its result file.

Every value is read from the run folder (run.json as the run's target reports it, events.jsonl, metrics.jsonl,
the checkpoint manifests); nothing is kept anywhere else, so a restarted server shows the same objects.
"""
from __future__ import annotations

import csv
import io
import time

from tunerun.cluster.run_folder import EvalRow, JsonlTail, RunFolder, TrainRow, complete_manifests, metric_rows, step_of
from tunerun.cluster.run_folder import events as read_events
from tunerun.cluster.runs import RunInfo, RunState
from tunerun.jobs.metrics import PREFERENCE, SCORES
from tunerun.jobs.service.errors import tenant_text
from tunerun.jobs.service.fine_tuning import ServiceRecord, checkpoint_model, fine_tuned_model

STATUS = {RunState.QUEUED: "queued", RunState.PENDING: "queued", RunState.RUNNING: "running",
          RunState.SUCCEEDED: "succeeded", RunState.FAILED: "failed", RunState.CANCELLED: "cancelled",
          RunState.PREEMPTED: "paused"}
RESULT_COLUMNS = ("step", "train_loss", "learning_rate", "tokens_per_s", "valid_loss", *SCORES)
HELD_OUT_BESIDE_LOSS = (*SCORES, *PREFERENCE)  # what a checkpoint or a result row shows where it was measured


_tail = JsonlTail()  # one per server: the job pages of every client share what it parsed


def job_object(run: RunFolder, record: ServiceRecord, info: RunInfo) -> dict:
    rows = metric_rows(run, _tail)
    status = STATUS[info.state]
    if info.state == RunState.RUNNING and not any(e["event"] == "data_prepared" for e in read_events(run, _tail)):
        status = "validating_files"  # the driver is reading, cleaning and checking the data
    last = rows.last_train
    return {
        "object": "fine_tuning.job",
        "id": record.job_id,
        "model": record.request.get("model", record.model),  # a ft: model the job started from, as OpenAI shows it
        "created_at": int(record.created_at),
        "finished_at": int(info.finished_at) if info.finished_at and info.state.terminal else None,
        "status": status,
        "fine_tuned_model": fine_tuned_model(record) if info.state == RunState.SUCCEEDED else None,
        "organization_id": record.project,
        "result_files": [record.result_file] if rows.train else [],
        "training_file": record.request["training_file"],
        "validation_file": record.request.get("validation_file"),
        "hyperparameters": record.hyperparameters,
        "method": _method(record),
        "trained_tokens": last.tokens_seen if last and info.state.terminal else None,
        "error": _error(info),
        "seed": record.seed,
        "estimated_finish": _estimated_finish(rows.train) if info.state == RunState.RUNNING else None,
        "metadata": record.metadata or None,
        "integrations": record.request.get("integrations") or [],
        "user_provided_suffix": record.suffix,
        # tunerun's own view, beside OpenAI's fields: the run id works with `tunerun status/logs/report/export`
        "tunerun": {"run_id": run.run_id, "state": str(info.state), "step": getattr(last, "step", None),
                    "total_steps": getattr(last, "total_steps", None), "last_loss": getattr(last, "loss", None),
                    "tokens_per_s": getattr(last, "tokens_per_s", None), "last_eval": _last_eval(rows.tuned_evals()),
                    "gates_passed": (info.gates or {}).get("passed")},
    }


def _method(record: ServiceRecord) -> dict:
    """OpenAI's ``method``: its type and the hyperparameters the job trains with (a dpo job's with its beta)."""
    if record.method == "dpo":
        return {"type": "dpo", "dpo": {"hyperparameters": {"beta": record.beta, **record.hyperparameters}}}
    return {"type": "supervised", "supervised": {"hyperparameters": record.hyperparameters}}


def _last_eval(evaluated: list[EvalRow]) -> dict | None:
    """The newest held-out metrics of the fine-tuned model."""
    return {"step": evaluated[-1].step, **evaluated[-1].held_out} if evaluated else None


def _error(info: RunInfo) -> dict | None:
    if info.state != RunState.FAILED:
        return None
    # tunerun's own codes where they tell the platform team what to do (free space; see why a driver died)
    code = {"user": "invalid_training_data", "disk_full": "disk_full", "driver_gone": "driver_gone"}.get(
        info.error_kind, "internal_error")
    return {"code": code, "message": tenant_text(info.error or "the run failed"), "param": None}


def _estimated_finish(train: list[TrainRow]) -> int | None:
    """From the pace of the steps seen in this attempt (a restarted worker group restarts ``elapsed_s``)."""
    attempt = train[-1:]
    for row in reversed(train[:-1]):
        if (row.elapsed_s or 0) > (attempt[0].elapsed_s or 0):
            break
        attempt.insert(0, row)
    if len(attempt) < 2 or attempt[-1].step == attempt[0].step:
        return None
    first, last = attempt[0], attempt[-1]
    pace = ((last.elapsed_s or 0) - (first.elapsed_s or 0)) / (last.step - first.step)
    return int(time.time() + pace * ((last.total_steps or last.step) - last.step))


# ── events ──────────────────────────────────────────────────────────────────────────────────────────────────

def events(run: RunFolder) -> list[dict]:
    """The run's lifecycle events and metrics as OpenAI job events, oldest first; ids are stable (a record's
    place in its append-only file)."""
    found = []
    for n, event in enumerate(read_events(run, _tail)):
        message, level = _describe(event)
        if message:
            found.append((event["time"], _event(f"ftevent-e{n}", event["time"], level, message, "message",
                                                {k: v for k, v in event.items() if k not in ("time", "event")})))
    for n, row in enumerate(metric_rows(run, _tail).ordered):
        if isinstance(row, TrainRow):
            data = {"step": row.step, "train_loss": row.loss, "total_steps": row.total_steps,
                    "learning_rate": row.lr, "tokens_per_s": row.tokens_per_s}
            message = f"Step {row.step}/{row.total_steps}: training loss={row.loss:.4f}"
        else:
            data = {"step": row.step, **row.held_out}
            shown = ", ".join(f"{k}={v:.4f}" for k, v in data.items() if k != "step" and isinstance(v, float))
            message = f"Step {row.step}: {'base model' if row.base else 'validation'} {shown}"
        found.append((row.time, _event(f"ftevent-m{n}", row.time, "info", message, "metrics", data)))
    # By the exact time: created_at has whole seconds, and a run's last eval and its end now fall in the same one
    return [event for _, event in sorted(found, key=lambda pair: pair[0])]


def _event(event_id: str, at: float, level: str, message: str, kind: str, data: dict) -> dict:
    return {"object": "fine_tuning.job.event", "id": event_id, "created_at": int(at), "level": level,
            "message": message, "type": kind, "data": data}


def _describe(event: dict) -> tuple[str | None, str]:
    kind = event["event"]
    messages = {
        "run_queued": "Job queued: waiting for a free slot",
        "run_waiting": f"Job queued in the cluster: {tenant_text(str(event.get('reason', '')))}",
        "run_created": "Job created",
        "run_dequeued": "Job started",
        "run_resumed": "Job resumed from its newest checkpoint",
        "data_prepared": (f"Files validated: {event.get('records_read')} records, {event.get('train_records')} for "
                          f"training, {event.get('eval_records')} held out"),
        "training_started": f"Fine-tuning started: {event.get('total_steps')} steps on {event.get('world_size')} "
                            "workers" + (f", from step {event['start_step']}" if event.get("start_step") else ""),
        "reference_ready": (f"Reference log-probabilities of {event.get('pairs')} preference pairs "
                            + ("computed before training" if event.get("source") == "computed" else "read back")),
        "checkpoint_saved": f"Checkpoint saved at step {event.get('step')}",
        "checkpoint_skipped": f"A damaged checkpoint was skipped: {tenant_text(str(event.get('detail', '')))}",
        "resumed": f"Training continues from the checkpoint at step {event.get('step')}",
        "checkpoint_and_stop_requested": "Pause requested: stopping at the next checkpoint",
        "run_succeeded": "The job has successfully completed",
        "run_cancelled": "The job was cancelled",
        "run_preempted": f"The job is paused ({event.get('detail', 'stopped at a checkpoint')})",
        "run_failed": f"The job failed: {tenant_text(str(event.get('error', '')))}",
    }
    level = "error" if kind == "run_failed" else "warn" if kind == "checkpoint_skipped" else "info"
    return messages.get(kind), level


# ── checkpoints ─────────────────────────────────────────────────────────────────────────────────────────────

def checkpoints(run: RunFolder, record: ServiceRecord) -> list[dict]:
    """Complete checkpoints (those with a manifest), newest first, with the metrics of their step."""
    train = {m.step: m for m in metric_rows(run, _tail).train}
    found = []
    for name, manifest in sorted(complete_manifests(run).items(), reverse=True):
        step, measured = manifest.get("step", step_of(name)), manifest.get("metrics") or {}
        at_step = train.get(step)
        metrics = {"step": step, "train_loss": at_step.loss if at_step else None,
                   "valid_loss": measured.get("loss"), "full_valid_loss": measured.get("loss"),
                   **{name: measured[name] for name in HELD_OUT_BESIDE_LOSS if measured.get(name) is not None}}
        found.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{record.job_id[6:]}-{step}",
                      "created_at": int(at_step.time if at_step else record.created_at),
                      "fine_tuned_model_checkpoint": checkpoint_model(record, step),
                      "step_number": step, "metrics": metrics, "fine_tuning_job_id": record.job_id})
    return found


# ── the result file ─────────────────────────────────────────────────────────────────────────────────────────

def result_file(run: RunFolder, record: ServiceRecord) -> dict:
    content = result_csv(run)
    return {"object": "file", "id": record.result_file, "bytes": len(content), "created_at": int(record.created_at),
            "filename": f"{record.job_id}-metrics.csv", "purpose": "fine-tune-results", "status": "processed",
            "status_details": None}


def result_csv(run: RunFolder) -> bytes:
    """One row per step: training loss, learning rate, throughput, and the held-out metrics where measured."""
    rows: dict[int, dict] = {}
    for m in metric_rows(run, _tail).ordered:
        if isinstance(m, EvalRow) and m.base:
            continue
        row = rows.setdefault(m.step, {"step": m.step})
        if isinstance(m, TrainRow):
            row.update(train_loss=m.loss, learning_rate=m.lr, tokens_per_s=m.tokens_per_s)
        else:
            row.update(valid_loss=m.value("eval_loss"), **{k: m.value(f"eval_{k}") for k in HELD_OUT_BESIDE_LOSS})
    pairs = [k for k in PREFERENCE if any(row.get(k) is not None for row in rows.values())]  # a dpo run's columns
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*RESULT_COLUMNS, *pairs], extrasaction="ignore")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    return out.getvalue().encode("utf-8")

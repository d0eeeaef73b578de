"""A run folder, seen as OpenAI's objects: the fine-tuning job, its events, its checkpoints, its result file.

Every value is read from the run folder (run.json as the run's target reports it, events.jsonl, metrics.jsonl,
the checkpoint manifests); nothing is kept anywhere else, so a restarted server shows the same objects.
"""
from __future__ import annotations

import csv
import io
import json
import threading
import time
from pathlib import Path

from tunerun.cluster.runs import CHECKPOINT_MANIFEST, CHECKPOINT_PREFIX, CHECKPOINTS, RunInfo, RunState
from tunerun.cluster.storage import RunFolder
from tunerun.jobs.metrics import SCORES
from tunerun.jobs.service.errors import tenant_text
from tunerun.jobs.service.fine_tuning import ServiceRecord

STATUS = {RunState.QUEUED: "queued", RunState.PENDING: "queued", RunState.RUNNING: "running",
          RunState.SUCCEEDED: "succeeded", RunState.FAILED: "failed", RunState.CANCELLED: "cancelled",
          RunState.PREEMPTED: "paused"}
RESULT_COLUMNS = ("step", "train_loss", "learning_rate", "tokens_per_s", "valid_loss", *SCORES)


class _AppendOnlyCache:
    """events.jsonl and metrics.jsonl only grow: on a local run folder, parse just the lines added since the last
    request (many clients poll a training job every second; re-parsing thousands of lines each time slowed its
    steps, bench/bench_serve.py). Object storage has no cheap size check for a growing object: read it whole."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: dict[Path, tuple[int, list[dict]]] = {}

    def records(self, run: RunFolder, name: str) -> list[dict]:
        if not run.is_local:
            return run.read_jsonl(name)
        path = run.local_path(name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return []
        with self._lock:
            offset, parsed = self._seen.get(path, (0, []))
            if size < offset:  # rewritten (not appended): start again
                offset, parsed = 0, []
            if size > offset:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read(size - offset)
                complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for next time
                parsed = parsed + [row for row in map(_parsed, complete.splitlines()) if row is not None]
                offset += len(complete)
                self._seen[path] = (offset, parsed)
            return parsed


def _parsed(line: bytes) -> dict | None:
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:  # as RunFolder.read_jsonl: a damaged line is skipped, not fatal
        return None


records = _AppendOnlyCache().records


def fine_tuned_model(record: ServiceRecord) -> str:
    """OpenAI's naming: ``ft:<base model>:<project>:<suffix>:<job id>``."""
    return f"ft:{record.model}:{record.project}:{record.suffix or ''}:{record.job_id}"


def job_object(run: RunFolder, record: ServiceRecord, info: RunInfo) -> dict:
    events, rows = records(run, "events.jsonl"), records(run, "metrics.jsonl")
    train = [m for m in rows if "loss" in m]
    status = STATUS[info.state]
    if info.state == RunState.RUNNING and not any(e["event"] == "data_prepared" for e in events):
        status = "validating_files"  # the driver is reading, cleaning and checking the data
    last = train[-1] if train else {}
    evaluated = [m for m in rows if "loss" not in m and not m.get("base")]
    return {
        "object": "fine_tuning.job",
        "id": record.job_id,
        "model": record.model,
        "created_at": int(record.created_at),
        "finished_at": int(info.finished_at) if info.finished_at and info.state.terminal else None,
        "status": status,
        "fine_tuned_model": fine_tuned_model(record) if info.state == RunState.SUCCEEDED else None,
        "organization_id": record.project,
        "result_files": [record.result_file] if train else [],
        "training_file": record.request["training_file"],
        "validation_file": record.request.get("validation_file"),
        "hyperparameters": record.hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": record.hyperparameters}},
        "trained_tokens": last.get("tokens_seen") if info.state.terminal else None,
        "error": _error(info),
        "seed": record.seed,
        "estimated_finish": _estimated_finish(train) if info.state == RunState.RUNNING else None,
        "metadata": record.metadata or None,
        "integrations": record.request.get("integrations") or [],
        "user_provided_suffix": record.suffix,
        # tunerun's own view, beside OpenAI's fields: the run id works with `tunerun status/logs/report/export`
        "tunerun": {"run_id": run.run_id, "state": str(info.state), "step": last.get("step"),
                    "total_steps": last.get("total_steps"), "last_loss": last.get("loss"),
                    "tokens_per_s": last.get("tokens_per_s"), "last_eval": _last_eval(evaluated),
                    "gates_passed": (info.gates or {}).get("passed")},
    }


def _last_eval(evaluated: list[dict]) -> dict | None:
    """The newest held-out metrics of the fine-tuned model (the base model's at step 0 are not its own)."""
    if not evaluated:
        return None
    row = evaluated[-1]
    return {"step": row["step"], **{k.removeprefix("eval_"): v for k, v in row.items()
                                    if k.startswith("eval_") and v is not None}}


def _error(info: RunInfo) -> dict | None:
    if info.state != RunState.FAILED:
        return None
    # tunerun's own codes where they tell the platform team what to do (free space; see why a driver died)
    code = {"user": "invalid_training_data", "disk_full": "disk_full", "driver_gone": "driver_gone"}.get(
        info.error_kind, "internal_error")
    return {"code": code, "message": tenant_text(info.error or "the run failed"), "param": None}


def _estimated_finish(train: list[dict]) -> int | None:
    """From the pace of the steps seen in this attempt (a restarted worker group restarts ``elapsed_s``)."""
    attempt = train[-1:]
    for row in reversed(train[:-1]):
        if row["elapsed_s"] > attempt[0]["elapsed_s"]:
            break
        attempt.insert(0, row)
    if len(attempt) < 2 or attempt[-1]["step"] == attempt[0]["step"]:
        return None
    pace = (attempt[-1]["elapsed_s"] - attempt[0]["elapsed_s"]) / (attempt[-1]["step"] - attempt[0]["step"])
    return int(time.time() + pace * (attempt[-1]["total_steps"] - attempt[-1]["step"]))


# ── events ──────────────────────────────────────────────────────────────────────────────────────────────────

def events(run: RunFolder) -> list[dict]:
    """The run's lifecycle events and metrics as OpenAI job events, oldest first; ids are stable (a record's
    place in its append-only file)."""
    found = []
    for n, event in enumerate(records(run, "events.jsonl")):
        message, level = _describe(event)
        if message:
            found.append(_event(f"ftevent-e{n}", event["time"], level, message, "message",
                                {k: v for k, v in event.items() if k not in ("time", "event")}))
    for n, row in enumerate(records(run, "metrics.jsonl")):
        if "loss" in row:
            data = {"step": row["step"], "train_loss": row["loss"], "total_steps": row["total_steps"],
                    "learning_rate": row["lr"], "tokens_per_s": row["tokens_per_s"]}
            message = f"Step {row['step']}/{row['total_steps']}: training loss={row['loss']:.4f}"
        else:
            data = {"step": row["step"], **{k.removeprefix("eval_"): v for k, v in row.items()
                                            if k.startswith("eval_") and v is not None}}
            shown = ", ".join(f"{k}={v:.4f}" for k, v in data.items() if k != "step" and isinstance(v, float))
            message = f"Step {row['step']}: {'base model' if row.get('base') else 'validation'} {shown}"
        found.append(_event(f"ftevent-m{n}", row["time"], "info", message, "metrics", data))
    return sorted(found, key=lambda e: e["created_at"])


def _event(event_id: str, at: float, level: str, message: str, kind: str, data: dict) -> dict:
    return {"object": "fine_tuning.job.event", "id": event_id, "created_at": int(at), "level": level,
            "message": message, "type": kind, "data": data}


def _describe(event: dict) -> tuple[str | None, str]:
    kind = event["event"]
    messages = {
        "run_queued": "Job queued: waiting for a free slot",
        "run_created": "Job created",
        "run_dequeued": "Job started",
        "run_resumed": "Job resumed from its newest checkpoint",
        "data_prepared": (f"Files validated: {event.get('records_read')} records, {event.get('train_records')} for "
                          f"training, {event.get('eval_records')} held out"),
        "training_started": f"Fine-tuning started: {event.get('total_steps')} steps on {event.get('world_size')} "
                            "workers" + (f", from step {event['start_step']}" if event.get("start_step") else ""),
        "checkpoint_saved": f"Checkpoint saved at step {event.get('step')}",
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
    train = {m["step"]: m for m in records(run, "metrics.jsonl") if "loss" in m}
    found = []
    for name in sorted(run.list_dir(CHECKPOINTS), reverse=True):
        key = f"{CHECKPOINTS}/{name}/{CHECKPOINT_MANIFEST}"
        if not name.startswith(CHECKPOINT_PREFIX) or not run.exists(key):
            continue
        manifest = run.read_json(key)
        step, measured = manifest["step"], manifest.get("metrics") or {}
        metrics = {"step": step, "train_loss": train.get(step, {}).get("loss"),
                   "valid_loss": measured.get("loss"), "full_valid_loss": measured.get("loss"),
                   **{name: measured[name] for name in SCORES if measured.get(name) is not None}}
        found.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{record.job_id[6:]}-{step}",
                      "created_at": int(train.get(step, {}).get("time", record.created_at)),
                      "fine_tuned_model_checkpoint": f"{fine_tuned_model(record)}:ckpt-step-{step}",
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
    for m in records(run, "metrics.jsonl"):
        if m.get("base"):
            continue
        row = rows.setdefault(m["step"], {"step": m["step"]})
        if "loss" in m:
            row.update(train_loss=m["loss"], learning_rate=m["lr"], tokens_per_s=m["tokens_per_s"])
        else:
            row.update(valid_loss=m.get("eval_loss"), **{k: m.get(f"eval_{k}") for k in SCORES})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    return out.getvalue().encode("utf-8")

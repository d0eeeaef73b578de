"""What a job produced beyond OpenAI's objects: its evaluation, its data report, the weights it exported.

tunerun's own endpoints (``/v1/fine_tuning/jobs/{id}/evaluation``, ``…/data_report``, ``…/artifacts``) return
these; the dashboard shows them, and any client with the project's key can read them. Read from the run folder
like everything else the server answers.
"""
from __future__ import annotations

from tunerun.cluster.run_folder import ARTIFACT_FOLDERS, RUN_INFO, RunFolder, eval_records
from tunerun.cluster.run_folder import data_report as read_data_report
from tunerun.cluster.runs import read_info
from tunerun.jobs.metrics import EVAL_SET, GENERATION
from tunerun.jobs.service.errors import ApiError

SHOWN_EXAMPLES = 5


def evaluation(run: RunFolder, job_id: str) -> dict:
    """Base vs fine-tuned metrics, the metrics of every evaluation, the gates, and a few held-out examples with
    the base model's and the newest model's answers side by side."""
    records = eval_records(run)
    base, tuned = records.base, records.final
    gates = read_info(run).gates if run.exists(RUN_INFO) else None
    return {
        "object": "fine_tuning.job.evaluation", "fine_tuning_job_id": job_id,
        "metric_names": [*EVAL_SET, "forgetting_drop"], "generation_metrics": list(GENERATION),
        "base": _measured(base), "tuned": _measured(tuned),
        "steps": [_measured(record) for record in records.steps],
        "gates": gates or (tuned or {}).get("gates"),
        "general": {"base": (base or {}).get("general"), "tuned": (tuned or {}).get("general")},
        "examples": _side_by_side(base, tuned),
    }


def _measured(record: dict | None) -> dict | None:
    if record is None:
        return None
    return {"step": record.get("step"), "metrics": {k: v for k, v in (record.get("metrics") or {}).items()
                                                    if v is not None}}


def _side_by_side(base: dict | None, tuned: dict | None) -> list[dict]:
    before = {e["index"]: e for e in (base or {}).get("examples", [])}
    after = {e["index"]: e for e in (tuned or {}).get("examples", [])}
    shown = []
    for index in sorted(set(before) | set(after))[:SHOWN_EXAMPLES]:
        either = after.get(index) or before[index]
        shown.append({"index": index, "prompt": either.get("prompt"), "reference": either.get("reference"),
                      "base_output": before.get(index, {}).get("output"),
                      "tuned_output": after.get(index, {}).get("output")})
    return shown


def data_report(run: RunFolder, job_id: str) -> dict:
    """data/data_report.json (counts only: PII as hits per type), once the run has prepared its data."""
    report = read_data_report(run)
    if report is None:
        raise ApiError(404, f"Job {job_id} has not prepared its data yet; its events say when it has",
                       "fine_tuning_job_id", "not_ready")
    from tunerun.trainer.data.report import steps  # torch-free: the report's own order of cleaning steps

    removed = [{"step": name, "records": n} for name, n in steps(report)]
    files = [name.rsplit("/", 1)[-1] for name in report.get("files", [])]  # the file ids: where is the server's
    return {"object": "fine_tuning.job.data_report", "fine_tuning_job_id": job_id, **report, "files": files,
            "removed": removed}


def artifacts(run: RunFolder, job_id: str) -> list[dict]:
    """Weights a job has to download: its adapter, and whatever `tunerun export` wrote (merged, GGUF)."""
    found = []
    for folder in ARTIFACT_FOLDERS:
        for name in sorted(run.list_dir(folder)):
            files = run.list_files(f"{folder}/{name}")
            if files:
                found.append({"object": "fine_tuning.job.artifact", "id": f"{folder}-{name}",
                              "kind": _kind(folder, name), "path": f"{folder}/{name}", "files": len(files),
                              "bytes": sum(files.values()),
                              "download_url": f"/v1/fine_tuning/jobs/{job_id}/artifacts/{folder}-{name}"})
    return found


def _kind(folder: str, name: str) -> str:
    if "gguf" in name:
        return "gguf"
    if "merged" in name or name == "model" or name.endswith("-model"):  # final/model, exports/<source>-model
        return "merged"
    return "adapter" if "adapter" in name else folder


def artifact(run: RunFolder, job_id: str, artifact_id: str) -> dict:
    for found in artifacts(run, job_id):
        if found["id"] == artifact_id:
            return found
    raise ApiError(404, f"Job {job_id} has no artifact {artifact_id!r}; its artifacts list says what it has",
                   "artifact_id", "not_found")

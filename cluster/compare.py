"""Runs side by side: held-out metrics, gates, data counts and hyperparameters, the best of each metric marked.

Teams refine their data two or three times before the final model; this answers "did it get better?". It reads
only the run folders (job.yaml, run.json, eval/*.json, data/data_report.json), so `tunerun compare` and the
service's ``GET /v1/fine_tuning/compare`` (the dashboard's compare page) show the same table. Metrics measured
on different eval sets do not compare: the table says so instead of ranking them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from tunerun.cluster.run_folder import JOB, RUN_INFO, RunFolder, data_report, eval_records, read_job
from tunerun.cluster.runs import read_info
from tunerun.jobs.metrics import GENERATION, PREFERENCE, lower_is_better

METRICS = ("loss", *GENERATION, "forgetting_drop")  # every comparison's rows; PREFERENCE's where a run has them
DATA_COUNTS = ("records_read", "malformed", "empty", "duplicates", "near_duplicates", "fuzzy_duplicates",
               "too_long_dropped", "train_records", "eval_records")
HYPERPARAMETERS = ("epochs", "max_steps", "learning_rate", "global_batch_size", "seed")


@dataclass
class RunSummary:
    run_id: str
    name: str | None
    state: str
    model: str | None
    method: str | None
    hyperparameters: dict
    data: dict  # DATA_COUNTS, plus pii_masked: total hits
    metrics: dict  # of the newest evaluation (the final one once the run finished)
    base_metrics: dict
    evaluated_step: int | None
    gates_passed: bool | None
    eval_set: str  # what the held-out set was made from; runs compare only on the same one
    eval_set_id: str = ""


@dataclass
class Comparison:
    runs: list[RunSummary]
    best: dict[str, list[str]] = field(default_factory=dict)  # metric → the run ids with its best value
    warnings: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        """The metric rows: `METRICS`, with the preference metrics where a run (a dpo run) measured them."""
        measured = [m for m in PREFERENCE if any(r.metrics.get(m) is not None for r in self.runs)]
        return [*METRICS[:-1], *measured, METRICS[-1]]

    def to_json(self) -> dict:
        return {"runs": [asdict(r) for r in self.runs], "best": self.best, "warnings": self.warnings,
                "metrics": self.metrics}


def summarize(run: RunFolder) -> RunSummary:
    spec = read_job(run).spec if run.exists(JOB) else None
    info = read_info(run) if run.exists(RUN_INFO) else None
    report = data_report(run) or {}
    records = eval_records(run)
    newest, base = records.final or {}, records.base or {}
    data = {name: report.get(name) for name in DATA_COUNTS}
    data["pii_masked"] = sum((report.get("pii_masked") or {}).values()) if report else None
    training = spec.training if spec else None
    eval_set = _eval_set(spec.data.model_dump(mode="json"), training.seed) if spec else "unknown (no job.yaml)"
    return RunSummary(
        run_id=run.run_id, name=spec.name if spec else None, state=str(info.state) if info else "unknown",
        model=spec.model.path if spec else None,
        method=(info.method if info else None) or (spec.method.kind if spec else None),
        hyperparameters={name: getattr(training, name, None) for name in HYPERPARAMETERS},
        data=data, metrics=_metrics(newest), base_metrics=_metrics(base),
        evaluated_step=newest.get("step"),
        gates_passed=((info.gates if info else None) or {}).get("passed"), eval_set=eval_set,
        eval_set_id=hashlib.sha256(eval_set.encode("utf-8")).hexdigest()[:12])


def _metrics(record: dict) -> dict:
    measured = record.get("metrics") or {}
    return {name: measured.get(name) for name in (*METRICS, *PREFERENCE)}


def _eval_set(data: dict, seed) -> str:
    """The held-out set's recipe: its own files, or the seeded share split off the training files."""
    if data.get("eval"):
        return f"data.eval={json.dumps(data['eval'])}"
    return (f"{data.get('eval_fraction')} of data.train={json.dumps(data.get('train'))} split with seed {seed}")


def compare(runs: list[RunFolder]) -> Comparison:
    summaries = [summarize(run) for run in runs]
    result = Comparison(summaries)
    sets = {s.eval_set_id for s in summaries if s.evaluated_step is not None}
    if len(sets) > 1:
        listed = "; ".join(f"{s.run_id}: {s.eval_set}" for s in summaries)
        result.warnings.append(f"these runs were evaluated on different eval sets, so their metrics do not compare "
                               f"({listed}); give them the same held-out file (data.eval, or validation_file in the "
                               "API) to compare them")
        return result
    for metric in result.metrics:
        measured = [(s.metrics[metric], s.run_id) for s in summaries if s.metrics.get(metric) is not None]
        if measured:  # a run not evaluated yet has no say
            best = (min if lower_is_better(metric) else max)(value for value, _ in measured)
            result.best[metric] = [run_id for value, run_id in measured if value == best]
    return result

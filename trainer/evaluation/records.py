"""Eval records: what one evaluation measured, judged (forgetting check, gates) and written to the run folder.

A record is ``{step, phase, base, time, metrics, examples}`` plus, when the general-instructions sample was
scored, ``general`` and ``general_examples``; a judged one adds ``gates``. `build_record` assembles it for the
train loop and for ``tunerun eval`` alike. During training (`evaluate_during_training`, every rank) the
general sample is scored before training and at the end — the drop is the forgetting check — and at the final
eval the gates are applied and run.json records the verdict. Rank 0 writes ``eval/base.json`` or
``eval/step-NNNNNN.json``; the train loop logs `metrics_row` to metrics.jsonl.
"""
from __future__ import annotations

import time

from tunerun.cluster.run_folder import EVAL_DATA, EvalRow, base_record, eval_record_name
from tunerun.jobs.metrics import GENERATION

_OPERATORS = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__, "==": float.__eq__}


def build_record(engine, tokenizer, eval_set: list[dict], job, *, step: int | None, phase: str,
                 general: bool, loss_batch_size: int, always_generate: bool = False) -> dict:
    """Measure ``engine`` (an `EvalEngine`; collective when a process group is up): the held-out loss and the
    generation metrics on ``eval_set``, and with ``general`` the general-instructions sample.

    Generation on the eval set runs when a generation metric or ``eval.label_pattern`` asks for it, or with
    ``always_generate`` (``tunerun eval`` shows a person how the weights answer even when only loss is scored).
    """
    from tunerun.trainer.evaluation.generation import evaluate_generation, load_general_set
    from tunerun.trainer.evaluation.loss import held_out_loss

    spec = job.spec.eval
    lockstep = engine.collective_forward
    metrics, examples = {}, []
    if eval_set and "loss" in spec.metrics:
        metrics.update(held_out_loss(engine, eval_set, tokenizer.pad_token_id, loss_batch_size))
    wanted = [m for m in GENERATION if m in spec.metrics]
    if eval_set and (wanted or spec.label_pattern or always_generate):
        found, examples = evaluate_generation(engine.module, tokenizer, eval_set, spec, engine.device, wanted,
                                              lockstep, spec.label_pattern)
        metrics.update(found)
    record = {"step": step, "phase": phase, "base": phase == "base", "time": time.time(),
              "metrics": metrics, "examples": examples}
    if general and spec.general is not None:
        sample = load_general_set(spec, job.spec.data.max_seq_len, tokenizer)
        record["general"], record["general_examples"] = evaluate_generation(
            engine.module, tokenizer, sample, spec, engine.device, list(GENERATION), lockstep)
    return record


def judge(record: dict, run, spec) -> dict:
    """Add the forgetting drop (against ``eval/base.json``) to the record's metrics and apply the gates."""
    base = base_record(run)
    record["metrics"].update(forgetting(spec, base, record))
    record["gates"] = apply_gates(spec, record["metrics"])
    return record["gates"]


# ── during training (the train loop calls this on every rank) ───────────────────────────────────────────────


def evaluate_during_training(engine, tokenizer, eval_set: list[dict], job, run, step: int, phase: str,
                             rank: int) -> dict:
    """Held-out loss and generation metrics (+ the forgetting sample at ``phase`` base/final, gates at final) on
    every rank; rank 0 writes ``eval/base.json`` or ``eval/step-NNNNNN.json`` (and run.json's gates, report.html
    at final). Returns the metrics row for metrics.jsonl ({} when nothing was measured)."""
    spec = job.spec.eval
    if not eval_set:
        require_eval_set(spec, f"{EVAL_DATA} holds no examples")
    record = build_record(engine, tokenizer, eval_set, job, step=step, phase=phase,
                          general=phase in ("base", "final"), loss_batch_size=job.spec.training.micro_batch_size)
    if not record["metrics"] and "general" not in record:
        return {}  # no eval set and no forgetting check at this step: nothing was measured
    if rank == 0:
        _write_training_record(record, run, spec, phase)
    return metrics_row(record)


def require_eval_set(spec, why: str) -> None:
    """Without eval examples only the forgetting check can run: gates on eval-set metrics cannot be judged."""
    from tunerun.jobs.errors import DataError

    blocked = [name for name in spec.gates if name != "forgetting_drop"]
    if blocked:
        raise DataError(f"eval.gates on {', '.join(blocked)} need an evaluation set, but {why}; set data.eval or "
                        "data.eval_fraction > 0")


def _write_training_record(record: dict, run, spec, phase: str) -> None:
    """Forgetting drop and gates need the base record: only rank 0 reads the run folder."""
    if phase == "final":
        from tunerun.cluster.runs import update_info

        gates = judge(record, run, spec)
        update_info(run, gates=gates)
        run.event("gates_checked", passed=gates["passed"])
    run.write_json(eval_record_name(record["step"], phase), record)
    if phase == "final":
        _write_report(run)


def _write_report(run) -> None:
    # A broken report must not fail a finished training run: the CLI `tunerun report` can rebuild it.
    try:
        from tunerun.trainer.report import write_report

        write_report(run)
    except Exception as exc:  # noqa: BLE001
        run.event("report_failed", error=f"{type(exc).__name__}: {exc}"[:500])


def forgetting(spec, base: dict | None, final: dict) -> dict:
    """forgetting_drop = base − final score on the general sample; flagged beyond eval.forgetting_threshold."""
    if spec.general is None or base is None or "general" not in base or "general" not in final:
        return {}
    drop = base["general"][spec.forgetting_metric] - final["general"][spec.forgetting_metric]
    return {"forgetting_drop": drop, "forgetting_flagged": drop > spec.forgetting_threshold}


def metrics_row(record: dict) -> dict:
    """Flat keys for metrics.jsonl: eval_loss, eval_exact_match, general_rouge_l, forgetting_drop, base…"""
    return EvalRow.from_record(record).model_dump(exclude={"step", "time"}, exclude_defaults=True)


# ── gates ───────────────────────────────────────────────────────────────────────────────────────────────────


def apply_gates(spec, metrics: dict) -> dict:
    """{passed, results: [{metric, condition, value, passed}]}; a gate whose metric was not measured fails."""
    results = []
    for name, op, threshold in spec.gate_checks():
        value = metrics.get(name)
        ok = value is not None and _OPERATORS[op](float(value), threshold)
        results.append({"metric": name, "condition": f"{op} {threshold:g}", "value": value, "passed": ok})
    return {"passed": all(r["passed"] for r in results), "results": results}

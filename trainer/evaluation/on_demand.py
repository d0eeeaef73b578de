"""``tunerun eval RUN``: re-evaluate a checkpoint (or the final weights) of a finished or running run, in this
process, exactly as training evaluated: the same method loads the weights (for qlora the same 4-bit base), the
same record is built and judged against the run's base record and gates."""
from __future__ import annotations

LOSS_BATCH = 8  # examples per held-out loss forward: one process, no gradients


def evaluate_run(run, job, checkpoint: int | None) -> dict:
    """Writes ``eval/on-demand/<step-NNNNNN|final>.json`` and returns the record."""
    from tunerun.cluster.run_folder import EVAL_DATA, on_demand_record_name
    from tunerun.jobs.errors import DataError
    from tunerun.trainer.data.pack import load_examples
    from tunerun.trainer.weights import find_weights, run_local_path

    eval_file = run_local_path(run, EVAL_DATA)
    eval_set = load_examples(eval_file)
    if not eval_set:  # said before torch and the method's stack are imported: seconds a mistake need not wait
        what = "is missing" if not eval_file.is_file() else "holds no examples"
        raise DataError(f"{run.run_id}: the evaluation set {EVAL_DATA} {what}; set data.eval or "
                        "data.eval_fraction > 0 in the job and rerun to evaluate")
    from tunerun.trainer.engines import EvalOnlyEngine, worker_device
    from tunerun.trainer.evaluation.records import build_record, judge
    from tunerun.trainer.methods import method_for
    from tunerun.trainer.objectives import objective_for
    from tunerun.trainer.tokenizer import load_tokenizer

    weights = find_weights(run, job, checkpoint)
    tokenizer = load_tokenizer(job)
    engine = EvalOnlyEngine(method_for(job.spec.method).load_trained(job, weights), worker_device(),
                            objective_for(job.spec))
    engine.objective.attach_reference(engine, {"eval": eval_set}, run, tokenizer.pad_token_id, LOSS_BATCH,
                                      untrained=False)  # the tuned model is no reference: the run's stored one
    record = build_record(engine, tokenizer, eval_set, job, step=weights.step, phase="on-demand", general=True,
                          loss_batch_size=LOSS_BATCH, always_generate=True)
    record["source"] = weights.name
    judge(record, run, job.spec.eval)
    run.write_json(on_demand_record_name(weights.name), record)
    return record

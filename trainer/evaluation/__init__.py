"""Evaluation: does the model now answer the way the eval set says it should?

- `metrics`: exact match, token F1 (SQuAD normalisation), ROUGE-L (as `rouge-score` scores it), label accuracy;
  torch-free.
- `generation`: prompts and references from tokenized examples, greedy generation, sharded across ranks.
- `loss`: the held-out loss, token-weighted, each rank scoring its shard.
- `records`: one eval record (loss + generation + the forgetting sample), the forgetting check, the gates, and
  what is written: ``eval/base.json``, ``eval/step-NNNNNN.json``, run.json's gates, the metrics.jsonl row.
- `on_demand`: `evaluate_run`, behind ``tunerun eval RUN``.

Evaluation imports no export code: the weights of a run are found by `tunerun.trainer.weights` and loaded by
the run's method (`tunerun.trainer.methods`).
"""

"""The metric vocabulary, defined once: which metrics exist, which come from generation, which way is better,
and how a metric value is written for a person (terminal, model card, report).

Torch-free: the spec checks names against it, the trainer computes what it lists, the CLI and reports show it.
"""
from __future__ import annotations

# What `eval.metrics` may ask for.
REQUESTABLE = ("loss", "exact_match", "f1", "rouge_l", "label_accuracy")
# Scores of greedy generation against the reference answer (label_accuracy needs eval.label_pattern).
GENERATION = ("exact_match", "f1", "rouge_l")
SCORES = (*GENERATION, "label_accuracy")
# Held-out preference pairs (training.objective dpo): how often, and by how much, the tuned model prefers the
# chosen answer over the rejected one more than the reference did, and the answers' log-probabilities (summed over
# an answer's tokens, averaged over pairs).
PREFERENCE = ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")
# Everything a run may record about its eval set; the names gates and checkpoint.best_metric may use.
EVAL_SET = ("loss", "perplexity", *SCORES, *PREFERENCE)
GATEABLE = (*EVAL_SET, "forgetting_drop")
LOWER_IS_BETTER = ("loss", "perplexity", "forgetting_drop", "rejected_logp")


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def format_value(value) -> str:
    """A metric value for people: 4 decimals for floats, an en dash for "not measured"."""
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)

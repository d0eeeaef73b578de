"""Scores of a generated answer against its reference; torch-free.

Exact match and token F1 with SQuAD's normalisation, ROUGE-L from `rouge-score` (on the same normalised
tokens), and with ``eval.label_pattern`` the accuracy of the label the pattern extracts.
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation (any Unicode P* class) and articles, squash spaces."""
    text = text.lower()
    text = "".join(" " if ch in string.punctuation or unicodedata.category(ch).startswith("P") else ch
                   for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _NormalizedTokens:
    """rouge-score's default tokenizer keeps only [a-z0-9]: accented and non-Latin text would score 0."""

    def tokenize(self, text: str) -> list[str]:
        return normalize_answer(text).split()


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_NormalizedTokens())
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def extract_label(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        return None
    return (match.group(1) if match.re.groups else match.group(0)).strip().casefold()


def score(predictions: list[str], references: list[str], metrics: list[str],
          label_pattern: str | None = None) -> dict:
    """Mean of each requested metric over the examples; label_accuracy over references the pattern matches."""
    n = max(len(predictions), 1)
    out = {}
    if "exact_match" in metrics:
        out["exact_match"] = sum(map(exact_match, predictions, references)) / n
    if "f1" in metrics:
        out["f1"] = sum(map(token_f1, predictions, references)) / n
    if "rouge_l" in metrics:
        out["rouge_l"] = sum(rouge_l(predictions, references)) / n
    if label_pattern is not None:
        pairs = [(extract_label(label_pattern, p), extract_label(label_pattern, r))
                 for p, r in zip(predictions, references)]
        scored = [(p, r) for p, r in pairs if r is not None]
        # None, not 0: a pattern that matches no reference measured nothing (a gate on it then fails, saying so)
        out["label_accuracy"] = sum(p == r for p, r in scored) / len(scored) if scored else None
    return out

"""Scores of a generated answer against its reference; torch-free.

Exact match and token F1 with SQuAD's normalisation, ROUGE-L as `rouge-score` computes it (on the same normalised
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


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference on the normalised tokens: what `rouge-score`'s
    ``RougeScorer(["rougeL"])`` computes with that tokenizer (tests hold the two equal), without importing it — it
    imports nltk, and nltk scipy: ~2 s of CPU in every worker that scores."""
    return [_lcs_fmeasure(normalize_answer(p).split(), normalize_answer(r).split())
            for p, r in zip(predictions, references)]


def _lcs_fmeasure(prediction: list[str], reference: list[str]) -> float:
    common = _lcs_length(reference, prediction) if prediction and reference else 0
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, one row of the dynamic-programming table at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


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

"""The scores of a generated answer: SQuAD-normalised exact match and token F1, ROUGE-L (rouge-score) on the same
tokens, label accuracy from eval.label_pattern."""
from __future__ import annotations

import pytest

from tunerun.trainer.evaluation import metrics


def test_squad_normalisation_exact_match_and_f1():
    assert metrics.normalize_answer("The  Cat, sat!") == "cat sat"
    assert metrics.exact_match("category: Refund.", "category: refund") == 1.0
    assert metrics.exact_match("category: billing", "category: refund") == 0.0
    assert metrics.token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 1))
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("x", "") == 0.0


def test_rouge_l_keeps_non_ascii_words():
    assert metrics.rouge_l(["category: refund please"], ["category: refund"]) == [pytest.approx(0.8)]
    # rouge-score's default tokenizer would drop these words entirely and score 0
    assert metrics.rouge_l(["Ölçüm başarılı"], ["ölçüm başarılı"]) == [pytest.approx(1.0)]


def test_rouge_l_is_what_rouge_score_computes_on_the_same_tokens():
    """The reference implementation, given tunerun's normalised tokens, on random word sequences (repeats, empty
    sides, no overlap) and the cases above: every F-measure equal."""
    import random

    from rouge_score import rouge_scorer

    class Normalized:
        def tokenize(self, text: str) -> list[str]:
            return metrics.normalize_answer(text).split()

    rng, words = random.Random(7), "refund login billing the a order card Ölçüm, x y!".split()
    pairs = [(" ".join(rng.choices(words, k=rng.randint(0, 12))), " ".join(rng.choices(words, k=rng.randint(0, 12))))
             for _ in range(400)] + [("category: refund please", "category: refund"), ("", ""), ("a", "the")]
    predictions, references = zip(*pairs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Normalized())
    expected = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs]
    assert metrics.rouge_l(list(predictions), list(references)) == pytest.approx(expected, abs=1e-12)


def test_label_accuracy_from_the_pattern_and_none_when_nothing_matches():
    preds = ["category: billing", "category: login\nthanks", "I think it is billing"]
    refs = ["category: billing", "category: refund", "category: billing"]
    scores = metrics.score(preds, refs, ["exact_match"], label_pattern=r"^category: (\w+)")
    assert scores["label_accuracy"] == pytest.approx(1 / 3) and scores["exact_match"] == pytest.approx(1 / 3)
    assert metrics.score(preds, refs, [], label_pattern=r"^label=(\w+)")["label_accuracy"] is None

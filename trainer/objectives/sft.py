"""Supervised fine-tuning: next-token cross-entropy on the tokens a record marks as trained.

What a record becomes is the data modules' work, which data preparation reaches through this objective:
`tunerun.trainer.data.render` renders a conversation and labels the assistant's tokens (``IGNORE_INDEX``
elsewhere), `fit` truncates or drops what is longer than ``data.max_seq_len``, `tunerun.trainer.data.pack` packs
examples into rows (``data.packing``) and pads them into batches (`collate`). The loss is the model's own: Hugging
Face causal LMs shift the labels and average cross-entropy over the labelled tokens, so a batch's loss is
token-weighted and the held-out loss sums ``loss × scored tokens`` per batch to stay token-weighted over the whole
eval set.

torch is imported inside the functions that need it: the memory planner reads `activation_sequences` without it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tunerun.trainer.data import pack, render
from tunerun.trainer.data.formats import FORMATS
from tunerun.trainer.data.render import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

    from tunerun.jobs.spec import JobSpec
    from tunerun.trainer.data.formats import Conversation

LOSS_CAP = 50.0  # exp(50) ≈ 5e21: past this perplexity says nothing, and exp would overflow soon after


class SupervisedFineTuning:
    NAME = "supervised fine-tuning"
    KEY = "sft"
    formats = FORMATS
    activation_sequences = 1  # one sequence (a record, or a packed row) per example
    packs = True  # position ids restarting at 0 keep packed examples apart (see `pack`)
    packing_refusal = ""
    held_out = ("loss", "perplexity")  # the names `held_out_metrics` returns
    compares_with_reference = False

    @classmethod
    def from_spec(cls, spec: JobSpec | None) -> "SupervisedFineTuning":
        return cls()  # nothing to set: the data section already decided rendering, masking and packing

    def attach_reference(self, engine, sets: dict[str, list[dict]], run, pad_token_id: int, batch_size: int,
                         untrained: bool) -> None:
        """Nothing: the loss reads the model being trained and the labels only."""

    def render(self, conversation: Conversation, tokenizer) -> tuple[str, render.Spans]:
        return render.render(conversation, tokenizer)

    def encode(self, rendered: list[tuple[str, render.Spans]], tokenizer) -> list[dict]:
        return [{"input_ids": ids, "labels": labels} for ids, labels in render.encode(rendered, tokenizer)]

    def fit(self, example: dict, max_len: int, too_long: str) -> tuple[dict | None, str]:
        ids, labels, verdict = example["input_ids"], example["labels"], "kept"
        if len(ids) > max_len:
            ids, labels, verdict = ids[:max_len], labels[:max_len], "truncated"
            if too_long == "drop" or labels.count(IGNORE_INDEX) == len(labels):
                return None, "too_long"
        if labels.count(IGNORE_INDEX) == len(labels):  # trainable text that rendered to no tokens
            return None, "empty"
        return {"input_ids": ids, "labels": labels}, verdict

    def length(self, example: dict) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict], pad_token_id: int) -> dict:
        return pack.collate(examples, pad_token_id)

    def tokens(self, batch: dict) -> int:
        # Packed batches carry no attention mask because they have no padding.
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def loss(self, forward, batch: dict) -> torch.Tensor:
        return forward(**batch).loss

    def score(self, forward, batch: dict) -> tuple[float, int]:
        """(summed token loss, scored tokens)."""
        tokens = scored_tokens(batch)
        return float(self.loss(forward, batch)) * tokens, tokens

    def held_out_metrics(self, sums: tuple[float, ...]) -> dict[str, float]:
        loss_sum, tokens = sums
        loss = loss_sum / max(int(tokens), 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, LOSS_CAP))}


def scored_tokens(batch: dict) -> int:
    # Causal LM loss predicts token t+1 from t: the first label of each row is never scored.
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

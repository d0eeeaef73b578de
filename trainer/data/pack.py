"""Sequence packing and batching: examples → rows → tensors.

Packing puts several examples in one row of at most ``max_seq_len`` tokens and restarts ``position_ids`` at 0
for each. With no attention mask, transformers (5.x, sdpa/eager attention) reads those restarts as sequence
boundaries (``masking_utils.find_packed_sequence_indices``) and builds a block-causal mask, so attention stays
inside each example. It only does so when the forward pass has no KV cache: the model must run with
``use_cache=False`` (what gradient checkpointing sets in training anyway), otherwise every example would see
the ones before it in its row. Evaluation examples are not packed.
"""
from __future__ import annotations

import os
from pathlib import Path

import orjson

from tunerun.trainer.data.render import IGNORE_INDEX

OPEN_ROWS = 64


class ExampleWriter:
    """Streams examples to a JSONL file (one ``{"input_ids", "labels"[, "position_ids"]}`` per line), the
    format `load_examples` reads; the file appears whole on `commit` or not at all."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.handle = self.tmp.open("wb")
        self.count = 0

    def write(self, example: dict) -> None:
        self.write_lines([example_line(example)])

    def write_lines(self, lines: list[bytes]) -> None:
        """Examples already serialised by `example_line` (e.g. lines of another `ExampleWriter`'s file), each
        ending in its newline."""
        self.handle.write(b"".join(lines))
        self.count += len(lines)

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def example_line(example: dict) -> bytes:
    """An example as a line of a prepared file, its newline included; data preparation's worker processes
    serialise with it, so only bytes cross back to the process that writes. orjson: ~2 µs for a few hundred
    token ids, json's ~19."""
    return orjson.dumps(example, option=orjson.OPT_APPEND_NEWLINE)


def load_examples(path: Path) -> list[dict]:
    """The examples of a prepared file (absent file: none)."""
    if not path.is_file():
        return []
    with path.open("rb") as handle:
        return [orjson.loads(line) for line in handle if line.strip()]


class Packer:
    """First fit over the last `OPEN_ROWS` rows: an example goes into the first open row it fits in; when
    too many rows are open, the oldest is written. Streaming, deterministic, and fills rows nearly as well
    as sorting by length would, without grouping examples of similar length into the same step."""

    def __init__(self, max_len: int, writer: ExampleWriter):
        self.max_len, self.writer = max_len, writer
        self.open: list[dict] = []
        self.rows = self.tokens = 0

    def add(self, ids: list[int], labels: list[int]) -> None:
        # The first token of an example is never predicted from the previous example's last token.
        labels = [IGNORE_INDEX, *labels[1:]]
        self.tokens += len(ids)
        row = next((r for r in self.open if len(r["input_ids"]) + len(ids) <= self.max_len), None)
        if row is None:
            if len(self.open) == OPEN_ROWS:
                self._write(self.open.pop(0))
            row = {"input_ids": [], "labels": [], "position_ids": []}
            self.open.append(row)
        row["input_ids"] += ids
        row["labels"] += labels
        row["position_ids"] += range(len(ids))
        if len(row["input_ids"]) == self.max_len:
            self.open.remove(row)
            self._write(row)

    def close(self) -> None:
        for row in self.open:
            self._write(row)
        self.open = []

    @property
    def efficiency(self) -> float:
        return self.tokens / (self.rows * self.max_len) if self.rows else 0.0

    def _write(self, row: dict) -> None:
        self.writer.write(row)
        self.rows += 1


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch to its longest example: ``input_ids`` with ``pad_token_id``, ``labels`` with -100;
    all ``torch.long``. Padded examples get ``attention_mask`` (1 on real tokens). Packed rows (they carry
    ``position_ids``) get ``position_ids`` instead and no mask, which is what makes attention block-causal;
    their padding (only the last rows of a set are short) is a separate sequence at the end that nothing
    attends to and no loss reads."""
    import torch

    width = max(len(ex["input_ids"]) for ex in batch)
    packed = "position_ids" in batch[0]
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(batch), width), dtype=torch.long)  # attention mask or position ids
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        if packed:
            extra[row, :n] = torch.tensor(ex["position_ids"], dtype=torch.long)
            extra[row, n:] = torch.arange(width - n)
        else:
            extra[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}

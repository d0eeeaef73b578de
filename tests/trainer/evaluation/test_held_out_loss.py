"""The held-out loss: token-weighted over the whole eval set, each rank its shard; with collective forwards
(ZeRO-3) every rank runs the same number of forwards, the stand-ins uncounted. Real torch.distributed (gloo)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tunerun.trainer.data.render import IGNORE_INDEX
from tunerun.trainer.evaluation.loss import held_out_loss
from tunerun.trainer.objectives import get_objective

EXAMPLES = [{"input_ids": list(range(1, 2 + n)), "labels": [IGNORE_INDEX, *range(2, 2 + n)]} for n in (3, 1, 4, 2, 5)]


class SummingEngine:
    """An `EvalEngine` whose summed "loss" of a batch is the sum of its scored label ids: the exact answer is
    known without a model."""

    collective_forward = True
    module = None
    device = torch.device("cpu")
    objective = get_objective("sft")  # batches the examples and turns the sums into the loss

    def __init__(self):
        self.calls = 0

    def eval_batch(self, batch: dict) -> tuple[float, int]:
        self.calls += 1
        labels = batch["labels"][:, 1:]
        scored = labels[labels != IGNORE_INDEX]
        return float(scored.sum()), int(scored.numel())


def expected_loss() -> float:
    scored = [label for ex in EXAMPLES for label in ex["labels"][1:] if label != IGNORE_INDEX]
    return sum(scored) / len(scored)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    engine = SummingEngine()
    result = held_out_loss(engine, EXAMPLES, pad_token_id=0, batch_size=2)
    Path(out, f"rank{rank}.json").write_text(json.dumps({**result, "calls": engine.calls}))
    dist.barrier()
    os._exit(0)  # as in test_evaluation: no gloo teardown while the peer exits


def test_one_process_scores_every_example():
    engine = SummingEngine()
    result = held_out_loss(engine, EXAMPLES, pad_token_id=0, batch_size=2)
    assert result["loss"] == expected_loss() and engine.calls == 3


def test_two_ranks_run_the_same_forwards_and_agree_on_the_whole_set(tmp_path, free_port):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 5 examples split 3/2, two per batch: rank 1 runs one stand-in batch so both run 2 forwards.
    assert [r["calls"] for r in ranks] == [2, 2]
    assert ranks[0] == ranks[1] and ranks[0]["loss"] == expected_loss()

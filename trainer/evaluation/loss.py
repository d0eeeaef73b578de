"""The held-out metrics of the job's objective (supervised fine-tuning: the token-weighted loss and perplexity),
each rank scoring its shard.

One function for the train loop (every rank, through the engine's training forward) and for ``tunerun eval``
(one process, `EvalOnlyEngine`). The objective (`tunerun.trainer.objectives`) batches the examples, gives each
batch's statistics as sums and turns the sums over the whole set into metrics; what this adds is the sharding,
the lockstep of collective forwards and the sum over ranks, which are the same whatever the objective.
"""
from __future__ import annotations

import math


def held_out_loss(engine, examples: list[dict], pad_token_id: int, batch_size: int) -> dict:
    """``engine.objective``'s held-out metrics over ``examples`` ({"loss", "perplexity"} for supervised
    fine-tuning); collective when a process group is up (all ranks call it).

    ``engine`` is an `tunerun.trainer.engines.EvalEngine`. With ``engine.collective_forward`` (ZeRO-3) every rank
    must run as many forwards as the others, so every rank runs as many batches as the largest shard needs and a
    rank whose shard is shorter scores a stand-in batch (example 0) that it does not count.
    """
    import torch
    import torch.distributed as dist

    from tunerun.trainer.batches import eval_shard

    if not examples:
        raise ValueError("no held-out examples to score")  # callers skip held-out metrics without an eval set
    objective = engine.objective
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    shard = eval_shard(len(examples), world, rank)
    batches = math.ceil(math.ceil(len(examples) / world) / batch_size)
    totals = None
    for start in range(0, batches * batch_size, batch_size):
        ids = shard[start:start + batch_size]
        sums = engine.eval_batch(objective.collate([examples[i] for i in ids or [0]], pad_token_id))
        if totals is None:
            totals = [0.0] * len(sums)
        if ids:
            totals = [total + value for total, value in zip(totals, sums)]
    if dist.is_initialized():
        reduced = torch.tensor(totals, dtype=torch.float64)
        dist.all_reduce(reduced)
        totals = reduced.tolist()
    return objective.held_out_metrics(tuple(totals))

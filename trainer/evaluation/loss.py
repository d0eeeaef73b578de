"""The held-out loss: token-weighted mean over the eval set (labelled tokens only), each rank its shard.

One function for the train loop (every rank, through the engine's training forward) and for ``tunerun eval``
(one process, `EvalOnlyEngine`).
"""
from __future__ import annotations

import math


def held_out_loss(engine, examples: list[dict], pad_token_id: int, batch_size: int) -> dict:
    """{"loss", "perplexity"} over ``examples``; collective when a process group is up (all ranks call it).

    ``engine`` is an `tunerun.trainer.engines.EvalEngine`. With ``engine.collective_forward`` (ZeRO-3) every rank
    must run as many forwards as the others, so every rank runs as many batches as the largest shard needs and a
    rank whose shard is shorter scores a stand-in batch (example 0) that it does not count.
    """
    import torch
    import torch.distributed as dist

    from tunerun.trainer.batches import eval_shard
    from tunerun.trainer.data.pack import collate

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    shard = eval_shard(len(examples), world, rank)
    batches = math.ceil(math.ceil(len(examples) / world) / batch_size)
    loss_sum, tokens = 0.0, 0
    for start in range(0, batches * batch_size, batch_size):
        ids = shard[start:start + batch_size]
        batch_loss, batch_tokens = engine.eval_batch(collate([examples[i] for i in ids or [0]], pad_token_id))
        if ids:
            loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
    if dist.is_initialized():
        totals = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)
        dist.all_reduce(totals)
        loss_sum, tokens = float(totals[0]), int(totals[1])
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

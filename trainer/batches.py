"""Which tokenized examples each worker trains on at each step.

The schedule is a pure function of (seed, epoch, step, rank): a resumed or restarted run picks up the exact
data position from the step counter alone, without replaying an iterator.
"""
from __future__ import annotations

import math
import random


class BatchSchedule:
    """Global batch = world_size × micro_batch × grad_accumulation examples per optimizer step."""

    def __init__(self, num_examples: int, world_size: int, micro_batch: int, grad_accumulation: int, seed: int):
        if num_examples < 1:
            raise ValueError("no training examples")
        self.n = num_examples
        self.world_size = world_size
        self.micro_batch = micro_batch
        self.accumulation = grad_accumulation
        self.seed = seed
        self.global_batch = world_size * micro_batch * grad_accumulation
        self.steps_per_epoch = max(1, math.ceil(num_examples / self.global_batch))
        self._order_epoch = -1
        self._order: list[int] = []

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            self._order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices for each micro-batch of ``rank`` at global ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        start = within * self.global_batch
        # The last batch of an epoch wraps around to the epoch's start, so every step is full-sized.
        step_ids = [order[(start + k) % self.n] for k in range(self.global_batch)]
        out = []
        for m in range(self.accumulation):
            offset = (m * self.world_size + rank) * self.micro_batch
            out.append(step_ids[offset:offset + self.micro_batch])
        return out

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


def eval_shard(num_examples: int, world_size: int, rank: int) -> list[int]:
    return list(range(rank, num_examples, world_size))

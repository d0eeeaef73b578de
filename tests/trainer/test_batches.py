"""BatchSchedule: which examples each rank trains on at each step, a pure function of (seed, step, rank), so a
run resumed at step k sees exactly the micro-batches it would have seen without the interruption."""
from __future__ import annotations

import itertools

import pytest

from tunerun.trainer.batches import BatchSchedule, eval_shard

N, SEED = 37, 42  # 37 examples: no global batch below divides it, so every epoch ends in a wrapped batch


def run_through(schedule: BatchSchedule, steps: range) -> dict[tuple[int, int], list[list[int]]]:
    """{(step, rank): micro-batches}, asked in the order the train loop asks (every rank at each step)."""
    return {(step, rank): schedule.micro_batches(step, rank)
            for step in steps for rank in range(schedule.world_size)}


@pytest.mark.parametrize("world, micro, accumulation", [(1, 4, 1), (2, 2, 2), (3, 1, 3), (4, 2, 1)])
def test_a_schedule_rebuilt_at_step_k_continues_exactly_across_epoch_boundaries(world, micro, accumulation):
    original = BatchSchedule(N, world, micro, accumulation, SEED)
    total = 3 * original.steps_per_epoch + 2  # into a fourth epoch
    expected = run_through(original, range(total))
    boundaries = [e * original.steps_per_epoch for e in (1, 2, 3)]
    for k in sorted({1, 2, original.steps_per_epoch - 1, *boundaries, *(b + 1 for b in boundaries), total - 1}):
        resumed = BatchSchedule(N, world, micro, accumulation, SEED)  # what a restarted worker builds
        assert run_through(resumed, range(k, total)) == {key: v for key, v in expected.items() if key[0] >= k}, k


@pytest.mark.parametrize("world, micro, accumulation", [(1, 4, 1), (2, 2, 2), (3, 1, 3)])
def test_every_step_is_full_and_every_epoch_sees_every_example(world, micro, accumulation):
    schedule = BatchSchedule(N, world, micro, accumulation, SEED)
    for epoch in range(3):
        steps = range(epoch * schedule.steps_per_epoch, (epoch + 1) * schedule.steps_per_epoch)
        seen = []
        for step in steps:
            assert schedule.epoch_of(step) == epoch
            per_rank = [schedule.micro_batches(step, rank) for rank in range(world)]
            assert all(len(mbs) == accumulation and all(len(mb) == micro for mb in mbs) for mbs in per_rank)
            step_ids = [i for mbs in per_rank for mb in mbs for i in mb]
            assert len(set(step_ids)) == len(step_ids) == schedule.global_batch  # ranks never share an example
            seen += step_ids
        assert set(seen) == set(range(N))


def test_the_order_depends_on_seed_and_epoch_only():
    a, b = BatchSchedule(N, 2, 2, 2, SEED), BatchSchedule(N, 2, 2, 2, SEED)
    steps = a.steps_per_epoch
    assert a.micro_batches(5, 1) == b.micro_batches(5, 1)
    assert a.micro_batches(0, 0) != a.micro_batches(steps, 0)  # each epoch is shuffled anew
    assert a.micro_batches(0, 0) != BatchSchedule(N, 2, 2, 2, SEED + 1).micro_batches(0, 0)


def test_eval_shards_split_the_eval_set_without_overlap():
    for world in (1, 2, 3):
        shards = [eval_shard(10, world, rank) for rank in range(world)]
        assert sorted(itertools.chain(*shards)) == list(range(10))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_no_examples_is_refused():
    with pytest.raises(ValueError, match="no training examples"):
        BatchSchedule(0, 1, 1, 1, SEED)

"""Checkpoint-and-stop on request: Slurm's ``--signal=B:USR1@…`` before a time limit, SIGTERM on preemption or
a Kubernetes eviction.

The driver turns the signal into a marker object in the run folder (it may live on S3, so the workers on
every node see it); rank 0 looks for it every few seconds and all ranks agree on it through one all-reduce
per step, so they write the same final checkpoint at the same step and stop. The job then ends as
``preempted``, and the next launch of the same run id (a requeue, a RayJob retry, ``--resume``) continues.
"""
from __future__ import annotations

import signal
import time

from tunerun.cluster.run_folder import CHECKPOINT_REQUEST as MARKER  # also written by `Target.pause`
from tunerun.cluster.run_folder import STOPPED
POLL_S = 2.0
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """The run stopped at a checkpoint because it was asked to; launching it again resumes it."""


def install_driver_handlers(run) -> list[str]:
    """On USR1/TERM write the marker (once) instead of dying; returns the list the handler records into."""
    received: list[str] = []

    def request(signum, _frame):
        if not received:
            run.write_json(MARKER, {"signal": signal.Signals(signum).name, "time": time.time()})
        received.append(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, request)
    return received


def clear(run) -> None:
    for name in (MARKER, STOPPED):
        if run.exists(name):
            run.delete(name)


class StopPoll:
    """Worker side: has anyone asked this run to checkpoint and stop?"""

    def __init__(self, run, rank: int):
        self.run, self.rank = run, rank
        self._next_check = 0.0
        self._seen = False

    def requested(self) -> bool:
        import torch
        import torch.distributed as dist

        if self.rank == 0 and not self._seen and time.monotonic() >= self._next_check:
            self._seen = self.run.exists(MARKER)
            self._next_check = time.monotonic() + POLL_S
        flag = torch.tensor([1.0 if self._seen else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

"""What a worker really used, written beside the memory planner's estimate (``memory.json`` in the run folder).

On a GPU the figure is PyTorch's peak allocated CUDA memory, the quantity the planner estimates (tensors only:
no CUDA context, no allocator cache). On CPU it is the process's peak resident set, which also holds the
Python interpreter, torch, Ray's worker runtime and the data, so it sits well above the estimate for small
models; and Linux starts a process's peak RSS at the high-water mark of the process it was forked from (kept
across ``exec``), so the figure is never below that of the process that started the worker.
"""
from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist


def peak_memory_bytes() -> int:
    """CUDA max allocated on a GPU worker, else the peak RSS of this process."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def measured_kind() -> str:
    return "cuda_max_allocated" if torch.cuda.is_available() and torch.cuda.is_initialized() else "peak_rss"


def write_memory_report(run, job, rank: int) -> None:
    """Collective: every rank contributes its peak; rank 0 writes ``memory.json``."""
    peaks = [peak_memory_bytes()]
    if dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, peaks[0])
        peaks = gathered
    if rank != 0:
        return
    run.write_json("memory.json", {
        "measured": measured_kind(),
        "measured_peak_bytes_per_worker": peaks,
        "estimate": _estimate(job),
    })


def _estimate(job) -> dict:
    from tunerun.jobs.memory import MemoryPlanError, estimate_for_spec

    try:
        return estimate_for_spec(job.spec).to_json()
    except (MemoryPlanError, OSError, ValueError) as exc:  # a finished run must not fail over its report
        return {"error": str(exc)}

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


def write_memory_report(run, job, rank: int, model: torch.nn.Module) -> None:
    """Collective: every rank contributes its peak and what it holds of ``model``; rank 0 writes ``memory.json``."""
    mine = (peak_memory_bytes(), zero3_partitions(model))
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    if rank != 0:
        return
    report = {
        "measured": measured_kind(),
        "measured_peak_bytes_per_worker": [peak for peak, _ in every],
        "estimate": _estimate(job),
    }
    if any(partitions for _, partitions in every):
        report["zero3_partitions_per_worker"] = [partitions for _, partitions in every]
    run.write_json("memory.json", report)


def zero3_partitions(model: torch.nn.Module) -> dict | None:
    """What this rank holds of each ZeRO-3 parameter: its partition (``ds_tensor``) over the whole parameter
    (``ds_numel``), for the packed 4-bit weights and for the other parameters; ``persistent`` counts those
    below DeepSpeed's persistence threshold, which stay gathered whole on every rank between steps. 1/N of each
    when ZeRO-3 really partitioned the model; None for a model ZeRO-3 does not manage."""
    groups: dict[str, list] = {}
    for param in model.parameters():
        if hasattr(param, "ds_tensor") and param.ds_numel:
            group = "weights_4bit" if type(param).__name__ == "Params4bit" else "other"
            groups.setdefault(group, []).append((param.ds_tensor.numel() / param.ds_numel,
                                                 bool(getattr(param, "ds_persist", False))))
    if not groups:
        return None
    return {group: {"count": len(entries), "share_min": min(s for s, _ in entries),
                    "share_max": max(s for s, _ in entries), "persistent": sum(p for _, p in entries)}
            for group, entries in groups.items()}


def _estimate(job) -> dict:
    from tunerun.jobs.memory import MemoryPlanError, estimate_for_spec

    try:
        return estimate_for_spec(job.spec).to_json()
    except (MemoryPlanError, OSError, ValueError) as exc:  # a finished run must not fail over its report
        return {"error": str(exc)}

"""The measured side of memory.json: a peak that really moves, and the report beside the planner's estimate."""
from __future__ import annotations

import json

from tunerun.trainer.memory_probe import measured_kind, peak_memory_bytes, write_memory_report


def test_peak_memory_follows_what_the_process_touched():
    import torch

    before = peak_memory_bytes()
    block = torch.ones(64 * 2**20 // 4 * 3)  # 192 MiB, every page written
    after = peak_memory_bytes()
    del block
    assert measured_kind() == "peak_rss"
    assert after - before > 150 * 2**20


def test_report_holds_every_rank_and_the_estimate_for_the_jobs_method(tiny_model_dir, tmp_path):
    from tunerun.cluster.storage import RunFolder
    from tunerun.jobs.plan import resolve
    from tunerun.jobs.spec import JobSpec

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    spec = JobSpec.model_validate({"model": {"path": str(tiny_model_dir)}, "data": {"train": str(data)},
                                   "method": {"kind": "lora"}, "storage": {"uri": str(tmp_path / "runs")}})
    job = resolve(spec, run_id="demo-1")
    run = RunFolder(job.spec.storage, job.run_id)
    write_memory_report(run, job, rank=0)
    report = json.loads((tmp_path / "runs" / "demo-1" / "memory.json").read_text())
    assert report["measured"] == "peak_rss"
    assert len(report["measured_peak_bytes_per_worker"]) == 1 and report["measured_peak_bytes_per_worker"][0] > 0
    estimate = report["estimate"]
    assert estimate["kind"] == "lora" and estimate["name"] == "LoRA" and estimate["total"] > estimate["weights"] > 0

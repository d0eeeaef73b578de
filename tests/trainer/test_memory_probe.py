"""The measured side of memory.json: a peak that really moves, and the report beside the planner's estimate.

Each measurement runs in a fresh Python process: peak RSS is a high-water mark of the whole process, and
whether CUDA is initialised decides what is measured, so inside the shared pytest process the outcome would
depend on which tests ran before. Not a direct child of pytest either: Linux carries a process's peak RSS across
``exec`` (a child's ``ru_maxrss`` starts at the high-water mark of the process it was forked from, measured:
813 MiB for a bare interpreter forked from an 800 MiB parent), so a small launcher process forks it instead.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PEAK = textwrap.dedent("""
    import json, torch
    from tunerun.trainer.memory_probe import measured_kind, peak_memory_bytes

    before = peak_memory_bytes()
    block = torch.ones(64 * 2**20 // 4 * 3)  # 192 MiB, every page written
    after = peak_memory_bytes()
    print(json.dumps({"before": before, "after": after, "kind": measured_kind()}))
""")

REPORT = textwrap.dedent("""
    import sys
    import torch
    from tunerun.cluster.run_folder import RunFolder
    from tunerun.jobs.plan import resolve
    from tunerun.jobs.spec import JobSpec
    from tunerun.trainer.memory_probe import write_memory_report

    model, data, runs = sys.argv[1:4]
    spec = JobSpec.model_validate({"model": {"path": model}, "data": {"train": data}, "method": {"kind": "lora"},
                                   "storage": {"uri": runs}})
    job = resolve(spec, run_id="demo-1")
    write_memory_report(RunFolder(job.spec.storage, job.run_id), job, rank=0, model=torch.nn.Linear(2, 2))
""")


LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def _python(code: str, *args: str) -> str:
    """stdout of ``python -c code args`` run in a fresh process forked from a small one."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", code, *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_peak_memory_follows_what_the_process_touched():
    measured = json.loads(_python(PEAK).strip().splitlines()[-1])
    assert measured["kind"] == "peak_rss"  # a CPU tensor never initialises CUDA, even where a GPU is present
    assert measured["after"] - measured["before"] > 150 * 2**20


def test_report_holds_every_rank_and_the_estimate_for_the_jobs_method(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    _python(REPORT, str(tiny_model_dir), str(data), str(tmp_path / "runs"))
    report = json.loads((tmp_path / "runs" / "demo-1" / "memory.json").read_text())
    assert report["measured"] == "peak_rss"
    assert len(report["measured_peak_bytes_per_worker"]) == 1 and report["measured_peak_bytes_per_worker"][0] > 0
    estimate = report["estimate"]
    assert estimate["kind"] == "lora" and estimate["name"] == "LoRA" and estimate["total"] > estimate["weights"] > 0
    assert "zero3_partitions_per_worker" not in report  # a model ZeRO-3 does not manage has no partitions to show


def test_zero3_partitions_counts_each_parameters_own_share():
    import torch

    from tunerun.trainer.memory_probe import zero3_partitions

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert zero3_partitions(model) is None
    for param, (held, persist) in zip(model.parameters(), [(8, False), (2, True), (8, False), (2, False)]):
        param.ds_tensor, param.ds_numel, param.ds_persist = torch.empty(held), param.numel(), persist
    other = zero3_partitions(model)["other"]
    assert other == {"count": 4, "share_min": 0.5, "share_max": 1.0, "persistent": 1}

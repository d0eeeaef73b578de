"""QLoRA under ZeRO-3 against DDP QLoRA: the same job (the tiny Llama, the ticket task, 2 workers) run both ways
through `tunerun run` on the embedded target; prints the training step time, tokens/s, memory and held-out exact
match of each, and their ratio.

    python bench/bench_qlora_zero3.py [--steps 40] [--workers 2] [--records 1100] [--eval-examples 200] [--quick]

ZeRO-3 gathers each layer's partitioned 4-bit weights before it computes and frees them after, in the forward and
again in the backward pass; DDP holds the whole base and only all-reduces the adapter gradients. The ratio is
that price, paid to fit a base that one GPU cannot hold. Step times come from ``metrics.jsonl`` (``elapsed_s``
over the steps after the first, which includes warm-up); memory from ``memory.json``. ``--quick`` (CI's smoke test,
tests/bench/test_benchmarks_run.py): one worker, 2 steps on 200 records, 4 held-out examples of 4 new tokens — proof
that both modes run (ZeRO-3 partitions over one rank too), not a measurement.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"DDP QLoRA": [], "QLoRA + ZeRO-3": ["method.zero={stage: 3}"]}


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(work: Path, model: Path, data: Path, mode: str, args) -> dict:
    run_id = "ddp" if not MODES[mode] else "zero3"
    steps, workers = args.steps, args.workers
    sets = [f"model.path={model}", f"data.train={data}", f"storage.uri={work / 'runs'}", "method.kind=qlora",
            f"training.max_steps={steps}", f"resources.workers_per_node={workers}",
            f"training.global_batch_size={4 * workers * 2}", f"eval.every_steps={steps}",
            f"checkpoint.every_steps={steps}", f"eval.max_new_tokens={args.max_new_tokens}",
            f"eval.max_examples={args.eval_examples}", "eval.general=null", *MODES[mode]]
    done = subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", "run", str(REPO / "jobs/examples/quickstart.yaml"),
                           *[a for s in sets for a in ("--set", s)], "--run-id", run_id], cwd=work,
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        sys.exit(f"{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    folder = work / "runs" / run_id
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    memory = json.loads((folder / "memory.json").read_text())
    return {"step_s": (train[-1]["elapsed_s"] - train[0]["elapsed_s"]) / (len(train) - 1),
            "tokens_per_s": train[-1]["tokens_per_s"],
            "exact_match": [r for r in rows if "eval_exact_match" in r][-1]["eval_exact_match"],
            "peak_rss": max(memory["measured_peak_bytes_per_worker"]), "estimate": memory["estimate"]["total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--records", type=int, default=1100, help="ticket records made for the job")
    parser.add_argument("--eval-examples", type=int, default=200, help="eval.max_examples")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a few small steps: that it runs, not a figure")
    args = parser.parse_args()
    if args.quick:  # the flags given still win over the quick sizes
        parser.set_defaults(steps=2, workers=1, records=200, eval_examples=4, max_new_tokens=4)
        args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-qlora-zero3-"))
    model = _example("make_tiny_model").make_tiny_model(work / "model")
    data = _example("make_support_data").make_support_data(work / "tickets.jsonl", n=args.records, seed=1)
    results = {mode: run(work, model, data, mode, args) for mode in MODES}
    for mode, r in results.items():
        print(f"{mode:16} step {r['step_s'] * 1000:7.1f} ms · {r['tokens_per_s']:8,.0f} tok/s · exact match "
              f"{r['exact_match']:.3f} · peak RSS {r['peak_rss'] / 2**20:,.0f} MiB (planner: "
              f"{r['estimate'] / 2**20:,.1f} MiB of tensors)")
    ddp, zero3 = results["DDP QLoRA"], results["QLoRA + ZeRO-3"]
    print(f"ratio step time ZeRO-3 / DDP: {zero3['step_s'] / ddp['step_s']:.2f}×  "
          f"(tokens/s {zero3['tokens_per_s'] / ddp['tokens_per_s']:.2f}×)")


if __name__ == "__main__":
    main()

"""tunerun's steady-state training step against the bare loop it wraps, same model, data and batch.

    python bench/bench_step_overhead.py [--steps 40] [--warmup 5] [--threads 1] [--quick]

``--quick`` (CI's smoke test, tests/bench/test_benchmarks_run.py): both cases, 3 timed steps of 2 × 32 tokens —
proof that it runs, not a measurement.

Both sides run in the same process, one Ray Train worker (the context tunerun's engines need), so threads,
allocator and Ray's runtime are the same for both:

* **LoRA** — tunerun: the `lora` method's model and `DDPEngine`, plus the loop's per-step work (batch
  schedule, collate, loss/token all-reduce, metrics line in the run folder). Bare: `from_pretrained` +
  `get_peft_model` + AdamW + scheduler, forward/backward/clip/step.
* **full, ZeRO-2** — tunerun: the `full` method's model and `DeepSpeedEngine` with the DeepSpeed config the
  planner generates, plus the same loop work. Bare: `deepspeed.initialize` with that config and
  ``engine(**batch).loss; engine.backward(loss); engine.step()``.

Steps alternate in blocks (tunerun, bare, tunerun, …) so that load from other processes on the machine hits
both sides alike; warmup steps are not timed. Target: tunerun / bare ≤ 1.05 (Ray's own release check allows
1.15 over native DDP). The model is a Llama built from a config (nothing from a hub).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODEL = dict(vocab_size=2000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=704, max_position_embeddings=512, tie_word_embeddings=False)


def make_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**MODEL)).save_pretrained(folder, safe_serialization=True)
    return folder


def make_jobs(workdir: Path, model: Path, args) -> dict:
    from tunerun.jobs.plan import resolve
    from tunerun.jobs.spec import JobSpec

    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(256)))
    base = {
        "name": "bench", "model": {"path": str(model), "dtype": "float32"}, "data": {"train": str(data)},
        "training": {"micro_batch_size": args.micro_batch, "global_batch_size": args.micro_batch,
                     "max_steps": 10_000, "gradient_checkpointing": False, "learning_rate": 1e-4},
        "resources": {"workers_per_node": 1}, "storage": {"uri": str(workdir / "runs")},
    }
    lora = {**base, "method": {"kind": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}}
    full = {**base, "method": {"kind": "full", "zero": {"stage": 2}}}
    return {name: resolve(JobSpec.model_validate(spec), run_id=f"bench-{name}").model_dump(mode="json")
            for name, spec in (("lora", lora), ("zero2", full))}


# ── inside the Ray Train worker ─────────────────────────────────────────────────────────────────────────────

def worker(config: dict) -> None:
    import torch

    torch.set_num_threads(config["threads"])
    results = {}
    for case, job_json in config["jobs"].items():
        tunerun_step, bare_step = build(case, job_json, config)
        results[case] = alternate(tunerun_step, bare_step, config["steps"], config["warmup"], config["block"])
    Path(config["out"]).write_text(json.dumps(results))


def build(case: str, job_json: dict, config: dict):
    import torch

    from tunerun.cluster.run_folder import RunFolder
    from tunerun.jobs.plan import ResolvedJob
    from tunerun.trainer import loop
    from tunerun.trainer.batches import BatchSchedule
    from tunerun.trainer.methods import get_method
    from tunerun.trainer.tracking import WorkerTrackers

    job = ResolvedJob.model_validate(job_json)
    spec = job.spec
    generator = torch.Generator().manual_seed(1)
    examples = [{"input_ids": ids, "labels": ids} for ids in
                torch.randint(4, MODEL["vocab_size"], (256, config["seq"]), generator=generator).tolist()]
    schedule = BatchSchedule(len(examples), 1, spec.training.micro_batch_size, spec.grad_accumulation, 0)
    method = get_method(spec.method.kind)
    engine = method.make_engine(method.load_model(job), job, 10_000)
    log = loop._RankZeroLog(RunFolder(spec.storage, job.run_id), 0, WorkerTrackers(None, None))  # tracks nothing
    objective = engine.objective
    state = {"tunerun": 0, "bare": 0}

    def tunerun_step() -> None:
        # The loop's per-step body (trainer/loop.py), minus eval and checkpoint, which a steady step skips.
        step = state["tunerun"]
        micro = [objective.collate([examples[i] for i in batch], 0) for batch in schedule.micro_batches(step, 0)]
        loss = engine.train_step(micro)
        loss, tokens = loop._all_reduce_mean_and_sum(loss, sum(objective.tokens(b) for b in micro))
        log.metrics(step=step + 1, loss=loss, lr=engine.lr, epoch=0, tokens_per_s=0.0, total_steps=10_000)
        state["tunerun"] += 1

    bare_model_step = bare_lora(job) if case == "lora" else bare_deepspeed(job)

    def bare_step() -> None:
        step = state["bare"]
        micro = [objective.collate([examples[i] for i in batch], 0) for batch in schedule.micro_batches(step, 0)]
        bare_model_step(micro)
        state["bare"] += 1

    return tunerun_step, bare_step


def bare_lora(job, device: str = "cpu"):
    """The plain PyTorch + PEFT loop a user would write (bench_gpu.py uses it too, with device="cuda")."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    spec = job.spec
    model = AutoModelForCausalLM.from_pretrained(spec.model.path, dtype=getattr(torch, spec.model.dtype)).to(device)
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = spec.method.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.training.learning_rate)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=10, num_training_steps=10_000)
    model.train()

    def step(micro: list[dict]) -> float:
        total = 0.0
        for batch in micro:
            loss = model(**batch).loss
            (loss / len(micro)).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, spec.training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def bare_deepspeed(job):
    """The plain DeepSpeed loop: the same config tunerun generates, initialize, forward/backward/step."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, get_scheduler

    config = json.loads(json.dumps(job.deepspeed))
    config["optimizer"]["params"]["torch_adam"] = True  # as DeepSpeedEngine does on CPU (FusedAdam is CUDA-only)
    config["zero_force_ds_cpu_optimizer"] = False
    model = AutoModelForCausalLM.from_pretrained(job.spec.model.path, dtype=torch.float32)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config,
        lr_scheduler=lambda opt: get_scheduler("cosine", opt, num_warmup_steps=10, num_training_steps=10_000))
    engine.train()

    def step(micro: list[dict]) -> float:
        total = 0.0
        for batch in micro:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            total += loss.item()
        return total

    return step


def alternate(tunerun_step, bare_step, steps: int, warmup: int, block: int) -> dict:
    for _ in range(warmup):
        tunerun_step()
        bare_step()
    times = {"tunerun": [], "bare": []}
    while len(times["tunerun"]) < steps:
        for name, step in (("tunerun", tunerun_step), ("bare", bare_step)):
            for _ in range(block):
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
    return times


# ── the driver ──────────────────────────────────────────────────────────────────────────────────────────────

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side and case")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--block", type=int, default=1, help="steps in a row before switching sides")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    # One thread by default: on a small shared machine a second thread mostly measures the neighbours.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few small steps: that it runs, not a figure")
    args = parser.parse_args()
    if args.quick:  # the flags given still win over the quick sizes
        parser.set_defaults(steps=3, warmup=1, seq=32, micro_batch=2)
        args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workdir = Path(tempfile.mkdtemp(prefix="tunerun-bench-"))
    jobs = make_jobs(workdir, make_model(workdir / "model"), args)
    out = workdir / "times.json"
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env)
    # address="local": a fresh instance even when a `ray start` cluster runs on this machine.
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    TorchTrainer(
        worker,
        train_loop_config={"jobs": jobs, "steps": args.steps, "warmup": args.warmup, "block": args.block,
                           "seq": args.seq, "threads": args.threads, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(workdir / "ray"), worker_runtime_env={"env_vars": env}),
    ).fit()
    ray.shutdown()
    report(json.loads(out.read_text()), args)
    return 0


def report(results: dict, args) -> None:
    print(f"model: Llama {MODEL['num_hidden_layers']} layers × {MODEL['hidden_size']} hidden, vocab "
          f"{MODEL['vocab_size']}, fp32; micro-batch {args.micro_batch} × {args.seq} tokens; {args.steps} timed "
          f"steps per side after {args.warmup} warmup; {args.threads} torch threads; CPU")
    print(f"{'case':8} {'side':8} {'mean ms':>9} {'median ms':>10} {'min ms':>8}")
    for case, times in results.items():
        for side in ("tunerun", "bare"):
            t = times[side]
            print(f"{case:8} {side:8} {1e3 * statistics.mean(t):9.1f} {1e3 * statistics.median(t):10.1f} "
                  f"{1e3 * min(t):8.1f}")
        ratios = {name: f(times["tunerun"]) / f(times["bare"])
                  for name, f in (("median", statistics.median), ("mean", statistics.mean), ("min", min))}
        verdict = "ok" if ratios["median"] <= 1.05 else "ABOVE TARGET"
        # The minimum is the step least disturbed by other processes: the best view of the intrinsic cost on a
        # busy machine; the median is the headline figure.
        print(f"{case:8} ratio tunerun/bare: median {ratios['median']:.3f}, mean {ratios['mean']:.3f}, "
              f"min {ratios['min']:.3f} (target ≤ 1.05 on the median: {verdict})")


if __name__ == "__main__":
    sys.exit(main())

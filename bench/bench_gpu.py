"""QLoRA and LoRA on a GPU: tokens/s, peak memory and MFU of tunerun's step against the bare loop, on a
~1.1B-parameter Llama built from a config (nothing from a hub). Skips, saying so, where there is no CUDA.

    python bench/bench_gpu.py [--steps 20] [--seq 1024] [--micro-batch 4] [--peak-tflops 989] [--quick]

One Ray Train worker on one GPU runs both sides, one after the other (a dedicated GPU is quiet enough for
that), each from a freshly loaded model so its peak memory is its own:

* tunerun: the `lora` / `qlora` method modules (the same `from_pretrained`, BitsAndBytesConfig,
  prepare_model_for_kbit_training and PEFT calls a run makes) and `DDPEngine`, plus the loop's per-step work.
* bare: the same libraries called directly: forward, backward, clip, AdamW step.

MFU = model FLOPs / (step time × the GPU's bf16 dense peak; H100 SXM 989 TFLOPS). Model FLOPs per token follow
the PaLM appendix B accounting, 2N forward + 12·L·h·s attention per token-pass; with a frozen base the backward
pass computes input gradients only (2N), so LoRA/QLoRA count 4N + attention, not 6N; recomputation under
gradient checkpointing is not counted (that would be hardware FLOPs utilisation). The planner's estimate for the
same job is printed beside the measured peak. ``--quick`` (CI's smoke test, tests/bench/test_benchmarks_run.py): 2 timed
steps of 1 × 128 tokens — proof that both sides run, not a measurement.
Published figures to compare with: torchtune Llama-3-8B QLoRA ≈ 2,400 tokens/s on an RTX 4090; LLaMA-Factory
Llama-2-7B QLoRA ≈ 2,300 tokens/GPU/s on an A100; llm-foundry 7B full training ≈ 46% MFU on H100s.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_overhead import bare_lora  # noqa: E402 - the same bare LoRA loop as the CPU benchmark

MODEL = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, max_position_embeddings=4096, tie_word_embeddings=False)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def model_flops_per_token(params: int, seq: int, frozen_base: bool) -> float:
    layers, hidden = MODEL["num_hidden_layers"], MODEL["hidden_size"]
    attention = 12 * layers * hidden * seq  # forward + backward of QK^T and AV (PaLM, appendix B)
    return (4 if frozen_base else 6) * params + attention


def make_jobs(workdir: Path, args) -> tuple[dict, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunerun.jobs.plan import resolve
    from tunerun.jobs.spec import JobSpec

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(workdir / "model", safe_serialization=True)
    del model
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(64)))
    jobs = {}
    for kind in args.methods:
        spec = {
            "name": "bench-gpu", "model": {"path": str(workdir / "model"), "dtype": "bfloat16"},
            "method": {"kind": kind, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
            "data": {"train": str(data), "max_seq_len": args.seq},
            "training": {"micro_batch_size": args.micro_batch, "global_batch_size": args.micro_batch,
                         "max_steps": 10_000, "gradient_checkpointing": args.checkpointing},
            "resources": {"workers_per_node": 1, "gpus_per_worker": 1, "gpu_memory_gb": 80},
            "storage": {"uri": str(workdir / "runs")},
        }
        jobs[kind] = resolve(JobSpec.model_validate(spec), run_id=f"bench-{kind}").model_dump(mode="json")
    return jobs, params


def worker(config: dict) -> None:
    import torch

    results = {}
    for kind, job_json in config["jobs"].items():
        results[kind] = {}
        for side in ("tunerun", "bare"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            step = build(side, kind, job_json, config)
            for _ in range(config["warmup"]):
                step()
            torch.cuda.synchronize()
            times = []
            for _ in range(config["steps"]):
                started = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            results[kind][side] = {"times": times, "peak_bytes": torch.cuda.max_memory_allocated()}
            del step
            gc.collect()  # the closure held the model: free it before the next side measures its own peak
    results["device"] = torch.cuda.get_device_name()
    Path(config["out"]).write_text(json.dumps(results))


def build(side: str, kind: str, job_json: dict, config: dict):
    import torch

    from tunerun.cluster.run_folder import RunFolder
    from tunerun.jobs.plan import ResolvedJob
    from tunerun.trainer import loop
    from tunerun.trainer.methods import get_method
    from tunerun.trainer.objectives import objective_for
    from tunerun.trainer.tracking import WorkerTrackers

    job = ResolvedJob.model_validate(job_json)
    objective = objective_for(job.spec)
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(4, MODEL["vocab_size"], (config["micro_batch"], config["seq"]), generator=generator)
    examples = [{"input_ids": row, "labels": row} for row in batch.tolist()]
    device = torch.device("cuda", 0)
    if side == "bare":
        step = bare_qlora(job) if kind == "qlora" else bare_lora(job, device="cuda")
        return lambda: step([{k: v.to(device) for k, v in objective.collate(examples, 0).items()}])
    method = get_method(kind)
    engine = method.make_engine(method.load_model(job), job, 10_000)
    log = loop._RankZeroLog(RunFolder(job.spec.storage, job.run_id), 0, WorkerTrackers(None, None))  # tracks nothing

    def tunerun_step() -> None:
        micro = [objective.collate(examples, 0)]
        loss = engine.train_step(micro)
        loss, tokens = loop._all_reduce_mean_and_sum(loss, sum(objective.tokens(b) for b in micro))
        log.metrics(step=0, loss=loss, lr=engine.lr, tokens_per_s=0.0)

    return tunerun_step


def bare_qlora(job):
    """The QLoRA recipe from the PEFT/bitsandbytes docs, called directly."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, get_scheduler

    spec = job.spec
    quant, lora = spec.method.quantization, spec.method.lora
    model = AutoModelForCausalLM.from_pretrained(
        spec.model.path, dtype=torch.bfloat16, device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                                               bnb_4bit_use_double_quant=quant.double_quant,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.training.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.training.learning_rate)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=10, num_training_steps=10_000)
    model.train()

    def step(micro: list[dict]) -> None:
        for batch in micro:
            (model(**batch).loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(params, spec.training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["qlora", "lora"], choices=["qlora", "lora"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: from the GPU name)")
    parser.add_argument("--quick", action="store_true", help="a few small steps: that it runs, not a figure")
    args = parser.parse_args()
    if args.quick:  # the flags given still win over the quick sizes
        parser.set_defaults(steps=2, warmup=1, seq=128, micro_batch=1)
        args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: skipped — no CUDA GPU on this machine (torch.cuda.is_available() is False)")
        print("ratio tunerun/bare step time: not measured (no GPU)")  # the line every benchmark prints
        return 0
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tunerun.jobs.memory import estimate_for_spec
    from tunerun.jobs.plan import ResolvedJob

    workdir = Path(tempfile.mkdtemp(prefix="tunerun-bench-gpu-"))
    jobs, params = make_jobs(workdir, args)
    out = workdir / "results.json"
    # address="local": a fresh instance even when a `ray start` cluster runs on this machine.
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    TorchTrainer(
        worker,
        train_loop_config={"jobs": jobs, "steps": args.steps, "warmup": args.warmup, "seq": args.seq,
                           "micro_batch": args.micro_batch, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=True),
        run_config=RunConfig(storage_path=str(workdir / "ray")),
    ).fit()
    ray.shutdown()
    results = json.loads(out.read_text())
    device = results.pop("device")
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    print(f"{device}: Llama {params / 1e9:.2f}B ({MODEL['num_hidden_layers']} layers × {MODEL['hidden_size']}), "
          f"micro-batch {args.micro_batch} × {args.seq} tokens, gradient checkpointing "
          f"{'on' if args.checkpointing else 'off'}, {args.steps} timed steps after {args.warmup} warmup")
    tokens = args.micro_batch * args.seq
    for kind, sides in results.items():
        estimate = estimate_for_spec(ResolvedJob.model_validate(jobs[kind]).spec).total
        rates = {}
        for side, measured in sides.items():
            step = statistics.median(measured["times"])
            rates[side] = tokens / step
            mfu = model_flops_per_token(params, args.seq, True) * rates[side] / (peak * 1e12) if peak else None
            print(f"  {kind:6} {side:8} {rates[side]:9,.0f} tokens/s  step {1e3 * step:7.1f} ms  peak "
                  f"{measured['peak_bytes'] / 2**30:5.1f} GiB (planner {estimate / 2**30:.1f} GiB)  "
                  f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}")
        print(f"  {kind:6} ratio tunerun/bare step time {rates['bare'] / rates['tunerun']:.3f} (target ≤ 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

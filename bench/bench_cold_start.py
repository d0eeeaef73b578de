"""Cold start: from `tunerun run` to the first optimizer step on the embedded target, broken down, against a
bare script that loads the same model and takes one step on the same tokens.

    python bench/bench_cold_start.py [--methods lora full] [--workers 1]

The breakdown comes from the run folder: every event and metrics line carries ``time``. The phases:

    CLI (import, validate, resolve)     bench start            → run_created        (events.jsonl)
    driver start                        run_created            → run_started
    data preparation                    run_started            → data_prepared
    Ray start (ray.init)                data_prepared          → "Started a local Ray instance" (driver log)
    Ray Train worker launch + imports   that line              → worker_ready.load_started
    model load                          load_started           → worker_ready.model_loaded
    engine init (DDP / DeepSpeed)       model_loaded           → worker_ready
    base evaluation                     worker_ready           → training_started
    first step                          training_started       → metrics.jsonl step 1

The bare baseline is one Python process: import torch/transformers/peft (deepspeed for full), load the model,
wrap it (PEFT, or `deepspeed.initialize` with tunerun's ZeRO-2 config on a one-process gloo group) and take one
optimizer step on the first micro-batch of the tokens tunerun prepared. It does no data preparation, so the
ratio is shown with and without that phase.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BARE = textwrap.dedent("""
    import json, os, sys, time
    started = time.time()
    import torch
    from transformers import AutoModelForCausalLM
    method, model_path, data_file, micro = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if method == "full":
        import deepspeed
    else:
        from peft import LoraConfig, get_peft_model
    imported = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    loaded = time.time()
    if method == "full":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo")
        config = json.loads(os.environ["BARE_DS_CONFIG"])
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    else:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ready = time.time()
    rows = [json.loads(line) for line in open(data_file)][:micro]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [3] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask)
    if method == "full":
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    else:
        model(**batch).loss.backward()
        optimizer.step()
    print(json.dumps({"import": imported - started, "model load": loaded - imported,
                      "engine init": ready - loaded, "first step": time.time() - ready,
                      "total": time.time() - started}))
""")


def make_job(workdir: Path, model: Path, method: str, workers: int) -> Path:
    method_block = ("method: {kind: lora, lora: {r: 16, alpha: 32, dropout: 0.0}}" if method == "lora"
                    else "method: {kind: full, zero: {stage: 2}}")
    text = textwrap.dedent(f"""\
        name: cold-start-{method}
        model: {{path: {model}, dtype: float32}}
        {method_block}
        data: {{train: {REPO / 'examples' / 'data' / 'support_tickets.jsonl'}, eval_fraction: 0.05, max_seq_len: 256}}
        training: {{max_steps: 2, micro_batch_size: 4, global_batch_size: {4 * workers}, gradient_checkpointing: false}}
        eval: {{every_steps: 1000, metrics: [loss], general: null}}
        checkpoint: {{every_steps: 1000}}
        resources: {{workers_per_node: {workers}}}
        storage: {{uri: {workdir / 'runs'}}}
        """)
    path = workdir / f"{method}.yaml"
    path.write_text(text)
    check = subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", "validate", str(path)], capture_output=True,
                           text=True)
    if check.returncode != 0:  # an older spec without eval.general: fall back to the plain eval settings
        path.write_text(text.replace("metrics: [loss], general: null", "metrics: [loss]"))
    return path


def run_tunerun(job: Path, run_id: str, workdir: Path) -> dict:
    # RAY_ADDRESS=local: a fresh embedded Ray even when a `ray start` cluster runs on this machine (plain
    # ray.init() would join that one, and refuses num_cpus when it does).
    env = {**os.environ, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "local")}
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", "run", str(job), "--run-id", run_id],
                            capture_output=True, text=True, cwd=workdir, env=env)
    if result.returncode != 0:
        raise SystemExit(f"tunerun run failed:\n{result.stdout}\n{result.stderr}")
    folder = workdir / "runs" / run_id
    events = {}
    for line in (folder / "events.jsonl").read_text().splitlines():
        record = json.loads(line)
        events.setdefault(record["event"], record)  # the first of each kind
    first_step = next(json.loads(line)["time"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line).get("step") == 1 and "loss" in json.loads(line))
    ready = events["worker_ready"]
    ray_up = _ray_started(folder) or events["data_prepared"]["time"]
    marks = [
        ("CLI (import, validate, resolve)", started, events["run_created"]["time"]),
        ("driver start", events["run_created"]["time"], events["run_started"]["time"]),
        # The driver prepares the data while Ray starts (tunerun.trainer.entrypoint.run_job): both from run_started
        ("data preparation", events["run_started"]["time"], events["data_prepared"]["time"]),
        ("Ray start (ray.init)", events["run_started"]["time"], ray_up),
        ("Ray Train worker launch + imports", ray_up, ready["load_started"]),
        ("model load", ready["load_started"], ready["model_loaded"]),
        ("engine init (DDP / DeepSpeed)", ready["model_loaded"], ready["time"]),
        ("base evaluation", ready["time"], events["training_started"]["time"]),
        ("first step", events["training_started"]["time"], first_step),
    ]
    return {"phases": {name: end - begin for name, begin, end in marks}, "total": first_step - started,
            "data": folder / "data" / "train.jsonl", "deepspeed": _resolved_deepspeed(folder)}


def _ray_started(folder: Path) -> float | None:
    """When ray.init finished: Ray logs "Started a local Ray instance" to the driver log, in local time."""
    import datetime as dt

    info = json.loads((folder / "run.json").read_text())
    log = Path((info.get("local") or {}).get("log") or folder / "logs" / "driver.log")
    found = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s+INFO .*Started a local Ray instance",
                      log.read_text(errors="replace") if log.is_file() else "", re.MULTILINE)
    return dt.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if found else None


def _resolved_deepspeed(folder: Path) -> dict | None:
    import yaml

    config = yaml.safe_load((folder / "job.yaml").read_text()).get("deepspeed")
    if config:
        config["optimizer"]["params"]["torch_adam"] = True  # CPU, as tunerun's DeepSpeedEngine does
        config["zero_force_ds_cpu_optimizer"] = False
        config["train_batch_size"] = config["train_micro_batch_size_per_gpu"]  # one process
        config["gradient_accumulation_steps"] = 1
    return config


def run_bare(method: str, model: Path, data: Path, deepspeed: dict | None) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "BARE_DS_CONFIG": json.dumps(deepspeed or {})}
    result = subprocess.run([sys.executable, "-c", BARE, method, str(model), str(data), "4"], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"bare baseline failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (the bare baseline is 1 process)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "examples"))
    from make_tiny_model import make_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="tunerun-cold-"))
    model = make_tiny_model(workdir / "tiny-llama")
    print(f"tiny Llama (2 layers, 64 hidden), {args.workers} worker(s), CPU; cold = fresh processes, warm disk cache")
    for method in args.methods:
        job = make_job(workdir, model, method, args.workers)
        measured = run_tunerun(job, f"cold-{method}", workdir)
        bare = run_bare(method, model, measured["data"], measured["deepspeed"])
        print(f"\n{method}: tunerun run → first optimizer step {measured['total']:.1f} s")
        for name, seconds in measured["phases"].items():
            print(f"  {name:34} {seconds:6.1f} s")
        print(f"  bare script → first step {bare['total']:.1f} s (" +
              ", ".join(f"{k} {v:.1f} s" for k, v in bare.items() if k != "total") + ")")
        # data preparation runs beside Ray's start now: it no longer adds to the total, so nothing is subtracted
        print(f"  ratio tunerun/bare: {measured['total'] / bare['total']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

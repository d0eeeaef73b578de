"""Cold start: from `tunerun run` to the first optimizer step on the embedded target, broken down, against the
floor every Ray-based runner pays (``ray.init`` + a trivial `TorchTrainer.fit`) and against a bare script that
loads the same model and takes one step on the same tokens.

    python bench/bench_cold_start.py [--methods lora full] [--workers 1] [--repeat 1] [--quick]

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

The floor (issue #30's target: tunerun ≤ 1.1× it) is one fresh Python process doing what any runner on Ray Train
must: ``ray.init`` as tunerun starts it, then `TorchTrainer.fit` with one worker whose train loop imports torch, takes
one optimizer step on a 8-weight linear model and reports it; measured from the process's launch to that step. It is
measured twice: the loop importing torch alone, and importing what the method's runner cannot do without
(transformers + peft for LoRA, transformers + deepspeed for full) — the fair floor, which the target is checked on.

The bare baseline is one Python process without Ray: import torch/transformers/peft (deepspeed for full), load the
model, wrap it (PEFT, or `deepspeed.initialize` with tunerun's ZeRO-2 config on a one-process gloo group) and take
one optimizer step on the first micro-batch of the tokens tunerun prepared. It does no data preparation.

``--repeat N`` measures every side N times, alternating (tunerun, floors, bare, tunerun, …) so that load from other
processes on the machine hits all alike, and shows the run of median total. ``--quick`` (CI's smoke test,
tests/bench/test_benchmarks_run.py): LoRA once, the fair floor only, no warm-up — proof that it runs, not a figure.
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


# Ray Train's floor: ray.init as tunerun's embedded target starts it, then a trivial fit whose loop imports what
# argv[1] names, takes one step and reports it. Prints when ray.init returned and when the step was taken.
FLOOR = textwrap.dedent("""
    import json, os, sys, tempfile, time
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config):
        import importlib
        for name in config["imports"]:
            importlib.import_module(name)
        import torch
        import ray.train
        model = torch.nn.Linear(8, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.ones(4, 8)).sum().backward()
        optimizer.step()
        with open(config["out"], "w") as out:
            out.write(str(time.time()))
        ray.train.report({"step": 1})

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
    ray_up = time.time()
    out = os.path.join(tempfile.mkdtemp(), "first_step")
    TorchTrainer(train_loop, train_loop_config={"imports": [m for m in sys.argv[1].split(",") if m], "out": out},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=tempfile.mkdtemp())).fit()
    print(json.dumps({"ray_up": ray_up, "first_step": float(open(out).read())}))
""")
RUNNER_IMPORTS = {"lora": ("transformers", "peft"), "full": ("transformers", "deepspeed")}


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


def run_floor(imports: tuple[str, ...]) -> dict:
    """Ray Train's own floor, from this process launching it to the worker's first step."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    started = time.time()
    result = subprocess.run([sys.executable, "-c", FLOOR, ",".join(imports)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise SystemExit(f"Ray Train floor failed:\n{result.stderr[-3000:]}")
    marks = json.loads(result.stdout.strip().splitlines()[-1])
    ray_up, first_step = marks["ray_up"], marks["first_step"]
    return {"ray.init": ray_up - started, "worker launch + imports + step": first_step - ray_up,
            "total": first_step - started}


def warm_disk_cache() -> None:
    """Read what every side loads once, untimed, so that none pays for the first read from disk."""
    subprocess.run([sys.executable, "-c", FLOOR, "transformers,peft,deepspeed"], capture_output=True,
                   env={**os.environ, "DS_ACCELERATOR": "cpu"})


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
    parser.add_argument("--repeat", type=int, default=1, help="alternating measurements of every side; medians shown")
    parser.add_argument("--quick", action="store_true", help="LoRA once, the fair floor only: that it runs")
    args = parser.parse_args()
    if args.quick:  # the flags given still win over the quick sizes
        parser.set_defaults(methods=["lora"])
        args = parser.parse_args()
    sys.path.insert(0, str(REPO / "examples"))
    from make_tiny_model import make_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="tunerun-cold-"))
    model = make_tiny_model(workdir / "tiny-llama")
    if not args.quick:
        warm_disk_cache()
    print(f"tiny Llama (2 layers, 64 hidden), {args.workers} worker(s), CPU; cold = fresh processes, warm disk cache; "
          f"{args.repeat} measurement(s) of each side, the median shown")
    for method in args.methods:
        job = make_job(workdir, model, method, args.workers)
        floors = {"torch": (), ", ".join(("torch",) + RUNNER_IMPORTS[method]): RUNNER_IMPORTS[method]}
        if args.quick:
            floors = dict(list(floors.items())[1:])
        measured, floor, bare = [], {name: [] for name in floors}, []
        for n in range(args.repeat):
            measured.append(run_tunerun(job, f"cold-{method}-{n}", workdir))
            for name, imports in floors.items():
                floor[name].append(run_floor(imports))
            bare.append(run_bare(method, model, measured[-1]["data"], measured[-1]["deepspeed"]))
        report(method, median_run(measured), {name: median_run(runs) for name, runs in floor.items()},
               median_run(bare))
    return 0


def median_run(runs: list[dict]) -> dict:
    """The run of median total (the lower middle one of an even count), phases and all."""
    return sorted(runs, key=lambda run: run["total"])[(len(runs) - 1) // 2]


def report(method: str, measured: dict, floors: dict, bare: dict) -> None:
    print(f"\n{method}: tunerun run → first optimizer step {measured['total']:.1f} s")
    for name, seconds in measured["phases"].items():
        print(f"  {name:34} {seconds:6.1f} s")
    print("  Ray Train floor (ray.init + trivial TorchTrainer.fit → first step), the loop importing")
    for name, floor in floors.items():
        print(f"    {name:32} {floor['total']:6.1f} s (" +
              ", ".join(f"{k} {v:.1f} s" for k, v in floor.items() if k != "total") + ")")
    print(f"  bare script → first step {bare['total']:.1f} s (" +
          ", ".join(f"{k} {v:.1f} s" for k, v in bare.items() if k != "total") + ")")
    # Data preparation runs beside Ray's start: it adds to the total only when it takes longer, so nothing is
    # subtracted. The last floor is the fair one: it imports what this method's runner needs.
    for n, (name, floor) in enumerate(reversed(floors.items())):
        ratio = measured["total"] / floor["total"]
        target = f" (target ≤ 1.1: {'ok' if ratio <= 1.1 else 'ABOVE TARGET'})" if n == 0 else ""
        print(f"  ratio tunerun/floor ({name}): {ratio:.2f}{target}")
    print(f"  ratio tunerun/bare: {measured['total'] / bare['total']:.2f}")


if __name__ == "__main__":
    sys.exit(main())

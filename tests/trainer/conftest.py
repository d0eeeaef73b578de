"""Finished runs as the train loop leaves them, for the evaluation and export tests; one Ray Train worker's context
for the engine tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

TICKETS = [("My invoice is wrong", "category: billing"), ("I cannot log in", "category: login"),
           ("The app crashes on start", "category: bug"), ("Please refund my order", "category: billing"),
           ("Password reset mail never came", "category: login"), ("Button does nothing", "category: bug")]


def _make_run(root: Path, model_dir: Path, kind: str = "lora", final: bool = True, checkpoint: bool = True,
              run_id: str = "r", job_yaml: str = ""):
    """A finished lora/qlora run folder with a trained-looking adapter (lora_B non-zero), as the loop leaves it:
    checkpoints/step-000002/ (trainable.safetensors, progress.json, manifest.json) and final/adapter/.
    Returns (run, job, the tuned PEFT model in eval mode)."""
    import torch
    import yaml
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tunerun.cluster.run_folder import RunFolder
    from tunerun.jobs.loader import load_job_text
    from tunerun.jobs.plan import resolve
    from tunerun.cluster import run_folder
    from tunerun.trainer import checkpoint as ckpt
    from tunerun.cluster.run_folder import TRAINABLE
    from tunerun.trainer.methods.lora import add_adapters

    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20)))
    job = resolve(load_job_text(f"name: t\nmodel: {{path: {model_dir}, dtype: float32}}\nmethod: {{kind: {kind}}}\n"
                                f"data: {{train: {data}}}\ntraining: {{learning_rate: 0.001}}\n{job_yaml}"),
                  run_id=run_id)
    run = RunFolder(str(root / "runs"), run_id)
    run.write_text("job.yaml", yaml.safe_dump(job.model_dump(mode="json")))
    run.write_json("run.json", {"run_id": run_id, "state": "succeeded", "method": kind})
    run.write_json("data/data_report.json", {"files": [str(data)], "format": "text", "records_read": 20,
                                             "train_records": 19, "eval_records": 1, "duplicates": 0,
                                             "pii_masked": {"email": 2}})
    torch.manual_seed(0)
    model = add_adapters(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), job)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    if checkpoint:
        folder = run.local_path("checkpoints/step-000002")
        folder.mkdir(parents=True)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(folder / TRAINABLE))
        (folder / ckpt.PROGRESS).write_text(json.dumps({"step": 2, "epoch": 0, "tokens_seen": 10}))
        run_folder.write_manifest(run, "checkpoints/step-000002", 2, ckpt.file_digests(folder))
    if final:
        model.save_pretrained(run.local_path("final/adapter"))
        run.event("exported", path=str(run.local_path("final/adapter")), step=2)
    return run, job, model.eval()


def _add_eval_set(run, tokenizer) -> None:
    """data/eval.jsonl as data preparation writes it: token ids + labels, rendered with the default template."""
    from tunerun.trainer.data.formats import Conversation
    from tunerun.trainer.data.render import encode, render

    rendered = [render(Conversation(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}]),
                       tokenizer) for q, a in TICKETS]
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in encode(rendered, tokenizer)]
    run.write_text("data/eval.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="session")
def make_run():
    """``make_run(root, model_dir, kind="lora", final=True, checkpoint=True, run_id="r", job_yaml="")`` →
    (run, job, tuned model): a finished run folder with final/adapter and checkpoints/step-000002."""
    return _make_run


@pytest.fixture(scope="session")
def add_eval_set(tokenizer):
    """``add_eval_set(run)`` writes the run's data/eval.jsonl: six support tickets, tokenized as in training."""
    return lambda run: _add_eval_set(run, tokenizer)


@pytest.fixture
def one_worker_context(monkeypatch):
    """`ray.train.torch.prepare_model` asks `ray.train.get_context()` for the local rank and world size, and
    only exists inside a Ray Train worker. For one worker it then moves the model to the device and, as the world
    size is 1, wraps nothing (Ray 2.60, ray/train/v2/torch/train_loop_utils.py): the context below is a worker's
    as Ray Train reports it, and the real prepare_model runs. DDP across two workers runs in
    tests/e2e/test_methods.py and test_s3_runs.py."""
    from types import SimpleNamespace

    import ray.train

    context = SimpleNamespace(get_local_rank=lambda: 0, get_world_size=lambda: 1, get_world_rank=lambda: 0)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)

"""Engines: a checkpoint's training state (weights, optimizer, scheduler) comes back identical and training
continues with the same next losses; the eval forward scores what the loss scores."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tunerun.cluster.run_folder import TRAINABLE
from tunerun.jobs.loader import load_job_text
from tunerun.jobs.plan import resolve
from tunerun.trainer import engines
from tunerun.trainer.data.pack import collate
from tunerun.trainer.data.render import IGNORE_INDEX


def examples(seed: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 200, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]})
    return out


def windows(n_steps: int) -> list[list[dict]]:
    """Accumulation windows of two padded micro-batches each, the same on every call."""
    return [[collate(examples(100 * step + m, 2), 0) for m in range(2)] for step in range(n_steps)]


def job_for(model_dir, tmp_path, method: str):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    return resolve(load_job_text(
        f"model: {{path: {model_dir}, dtype: float32}}\nmethod: {method}\ndata: {{train: {data}}}\n"
        "training: {learning_rate: 0.01, lr_scheduler: cosine, warmup_ratio: 0.25, micro_batch_size: 2, "
        "global_batch_size: 4}\nresources: {workers_per_node: 1}\n"), run_id="e")


def lora_engine(job, total_steps: int):
    from tunerun.trainer.methods import get_method

    method = get_method("lora")
    return method.make_engine(method.load_model(job), job, total_steps)


def state_of(engine) -> dict:
    trainable = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    optimizer = copy.deepcopy(engine.optimizer.state_dict())  # the live state tensors change in place
    scheduler = {k: v for k, v in engine.scheduler.state_dict().items() if k != "lr_lambdas"}
    return {"trainable": trainable, "optimizer": optimizer, "scheduler": scheduler, "lr": engine.lr}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["trainable"].keys() == b["trainable"].keys()
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, state in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"][index]
        assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)
    assert a["scheduler"] == b["scheduler"] and a["lr"] == b["lr"]


def test_ddp_engine_state_round_trip_continues_training_identically(tiny_model_dir, tmp_path, one_worker_context):
    job = job_for(tiny_model_dir, tmp_path, "{kind: lora, lora: {dropout: 0.0}}")
    steps = windows(5)
    torch.manual_seed(0)
    first = lora_engine(job, total_steps=5)
    assert isinstance(first, engines.Engine) and not first.collective_forward
    before = [first.train_step(w) for w in steps[:2]]
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    first.save_state(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([TRAINABLE, engines.OPTIMIZER,
                                                               engines.SCHEDULER])
    saved = state_of(first)
    continued = [first.train_step(w) for w in steps[2:]]

    torch.manual_seed(1)  # a fresh worker: other LoRA initial weights, which the checkpoint must overwrite
    resumed = lora_engine(job, total_steps=5)
    assert not all(torch.equal(p, saved["trainable"][n]) for n, p in resumed.module.named_parameters()
                   if p.requires_grad)
    resumed.load_state(folder)
    assert_same_state(state_of(resumed), saved)
    assert [resumed.train_step(w) for w in steps[2:]] == continued
    assert continued[-1] < before[0]  # it trained: the loss on these batches fell
    assert_same_state(state_of(resumed), state_of(first))


def test_eval_batch_is_the_token_weighted_loss_of_the_model(tiny_model_dir, tmp_path, one_worker_context):
    from tunerun.trainer.evaluation.loss import held_out_loss

    job = job_for(tiny_model_dir, tmp_path, "{kind: lora}")
    engine = lora_engine(job, total_steps=1)
    batch = collate(examples(7, 3), 0)
    loss_sum, tokens = engine.eval_batch(batch)
    assert tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        assert loss_sum / tokens == pytest.approx(float(engine.module(**batch).loss), rel=1e-6)
    eval_set = examples(8, 7)
    alone = engines.EvalOnlyEngine(engine.module, engine.device, engine.objective)
    assert isinstance(alone, engines.EvalEngine) and not isinstance(alone, engines.Engine)
    # Token-weighted over the set: the batch size changes nothing but the arithmetic's order.
    one, three = held_out_loss(alone, eval_set, 0, 1), held_out_loss(engine, eval_set, 0, 3)
    assert one["loss"] == pytest.approx(three["loss"], rel=1e-5)
    per_example = [alone.eval_batch(collate([ex], 0)) for ex in eval_set]
    assert one["loss"] == pytest.approx(sum(s for s, _ in per_example) / sum(t for _, t in per_example), rel=1e-6)


DEEPSPEED_ROUND_TRIP = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist, yaml
    from pathlib import Path
    from tunerun.jobs.plan import ResolvedJob
    from test_engines import windows
    from tunerun.trainer.engines import Engine
    from tunerun.trainer.methods import get_method

    job = ResolvedJob.model_validate(yaml.safe_load(Path(sys.argv[1]).read_text()))
    folder = Path(sys.argv[2])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=0, world_size=1)
    full = get_method("full")
    steps = windows(4)

    def engine():
        return full.make_engine(full.load_model(job), job, total_steps=4)

    def weights(e):
        return {n: t.float().clone() for n, t in e.full_state_dict().items()}

    torch.manual_seed(0)
    first = engine()
    before = [first.train_step(w) for w in steps[:2]]
    first.save_state(folder)
    saved, lr = weights(first), first.lr
    continued = [first.train_step(w) for w in steps[2:]]
    resumed = engine()  # the base weights again, as a restarted worker loads them
    changed = sum(not torch.equal(t, saved[n]) for n, t in weights(resumed).items())
    resumed.load_state(folder)
    restored_lr = resumed.lr
    same = all(torch.equal(t, saved[n]) for n, t in weights(resumed).items())
    again = [resumed.train_step(w) for w in steps[2:]]
    print(json.dumps({"before": before, "continued": continued, "again": again, "changed_by_training": changed,
                      "restored": same, "lr": [lr, restored_lr], "stage": first.zero_stage,
                      "collective": first.collective_forward, "engine": isinstance(first, Engine)}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])  # ZeRO-1 and -2 share DeepSpeed's optimizer (and its state's classes)
def test_deepspeed_engine_state_round_trip_on_one_cpu_rank(tiny_model_dir, tmp_path, free_port, stage):
    """One real DeepSpeed ZeRO process (gloo, DS_ACCELERATOR=cpu): save_state after two steps, a fresh engine
    on the base weights loads it (through the plain-data loader) and the next two losses are the same."""
    import yaml

    job = job_for(tiny_model_dir, tmp_path, f"{{kind: full, zero: {{stage: {stage}}}}}")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json")))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__),
                                                                  os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_ROUND_TRIP, str(tmp_path / "job.yaml"),
                           str(tmp_path / "checkpoint"), str(free_port())],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["stage"] == stage and result["collective"] == (stage == 3) and result["engine"]
    assert (tmp_path / "checkpoint" / engines.DEEPSPEED_TAG).is_dir()
    assert result["changed_by_training"] > 10 and result["restored"]
    assert result["lr"][0] == result["lr"][1]  # the scheduler came back with the optimizer
    assert result["again"] == result["continued"]
    assert result["continued"][-1] < result["before"][0]

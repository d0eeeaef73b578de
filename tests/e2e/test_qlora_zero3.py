"""QLoRA under DeepSpeed ZeRO-3, end to end as a user runs it: `tunerun run` on an embedded Ray with 2 CPU workers
(gloo, DS_ACCELERATOR=cpu), the tiny Llama loaded 4-bit through `from_pretrained` with its packed weights
partitioned across the workers, gradient checkpointing on as a 70B job runs it (jobs/examples/qlora-70b-zero3.yaml).

One run serves every test here: the session fixture ``sharded_qlora`` (conftest.py, learning_task.py), the ticket
task that test_learning.py also compares with DDP QLoRA. It is killed after a checkpoint, resumed with `--resume`,
and then evaluated, exported (adapter, merged, GGUF) and refused a resume on another worker count.
"""
from __future__ import annotations

import json

import pytest
from learning_task import QUICKSTART, REPO

pytestmark = pytest.mark.slow


def test_killed_run_resumes_where_its_checkpoint_left_it(sharded_qlora):
    sharded, STEPS = sharded_qlora, sharded_qlora.steps
    log = (sharded.folder / "logs" / "driver.log").read_text()
    assert sharded.resume.returncode == 0, sharded.resume.stdout + sharded.resume.stderr + log[-4000:]
    assert sharded.info["state"] == "succeeded"
    resumed = [e for e in sharded.rows("events.jsonl") if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["world_size"] == 2
    start = resumed[0]["step"]
    assert start >= sharded.every and start % sharded.every == 0 and start < max(sharded.killed_losses)
    rows = [r for r in sharded.rows() if "loss" in r]
    relaunched = {r["step"]: r["loss"] for r in rows[len(sharded.killed_losses):]}
    assert sorted(relaunched) == list(range(start + 1, STEPS + 1))  # the step count continues from the checkpoint
    # optimizer, scheduler, RNG and data position restored: the steps both launches ran give the same loss
    again = [step for step in relaunched if step in sharded.killed_losses]
    assert again
    for step in again:
        assert relaunched[step] == pytest.approx(sharded.killed_losses[step], rel=1e-3, abs=1e-4), step
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    evals = [r for r in sharded.rows() if "eval_loss" in r]
    assert evals[0]["base"] and evals[-1]["step"] == STEPS and evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"]
    assert (sharded.folder / "eval" / f"step-{STEPS:06d}.json").is_file()


def test_every_worker_holds_half_of_each_4bit_weight(sharded_qlora):
    """ZeRO-3 really partitioned the 4-bit base: on both ranks each packed weight's own partition is half its
    storage, and none stays gathered whole; the measured peak sits beside the planner's estimate."""
    sharded = sharded_qlora
    memory = json.loads((sharded.folder / "memory.json").read_text())
    partitions = memory["zero3_partitions_per_worker"]
    assert len(partitions) == 2
    for rank in partitions:
        packed = rank["weights_4bit"]
        assert packed["count"] == 14  # 7 linears × 2 layers
        assert packed["share_min"] == packed["share_max"] == 0.5 and packed["persistent"] == 0
        assert rank["other"]["share_max"] == 0.5  # embeddings, norms and the adapters too
    assert memory["estimate"]["name"] == "QLoRA + ZeRO-3" and memory["estimate"]["zero"]["stage"] == 3
    assert len(memory["measured_peak_bytes_per_worker"]) == 2


def test_checkpoints_hold_the_adapters_and_their_optimizer_not_the_base(sharded_qlora):
    sharded, STEPS = sharded_qlora, sharded_qlora.steps
    from tunerun.cluster.run_folder import verify
    from tunerun.trainer.engines import load_deepspeed_file

    folder = sharded.folder / "checkpoints" / f"step-{STEPS:06d}"
    assert verify(folder) is None
    shards = sorted(p.name for p in (folder / "deepspeed").iterdir())
    assert sum(name.endswith("optim_states.pt") for name in shards) == 2  # one optimizer partition per rank
    for states in (folder / "deepspeed").glob("*model_states.pt"):
        module = load_deepspeed_file(states, map_location="cpu")["module"]
        assert module and all(".lora_" in key for key in module), sorted(module)[:5]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 2_000_000


def test_eval_and_exports_answer_like_the_adapter_on_the_unquantised_base(sharded_qlora, tunerun, tiny_model_dir):
    sharded = sharded_qlora
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    storage = ["--storage", str(sharded.storage)]
    again = tunerun("eval", sharded.run_id, *storage, cwd=sharded.cwd, env=sharded.env, timeout=900)
    assert again.returncode == 0, again.stderr
    on_demand = json.loads((sharded.folder / "eval" / "on-demand" / "final.json").read_text())["metrics"]
    final = [r for r in sharded.rows() if "eval_loss" in r][-1]
    assert on_demand["loss"] == pytest.approx(final["eval_loss"], rel=0.02)

    adapter = sharded.folder / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    merged = tunerun("export", sharded.run_id, "--merge", "--to", str(sharded.cwd / "merged"), *storage,
                     cwd=sharded.cwd, env=sharded.env, timeout=900)
    assert merged.returncode == 0, merged.stderr
    model = AutoModelForCausalLM.from_pretrained(sharded.cwd / "merged")
    assert model.dtype == torch.bfloat16 and not hasattr(model.config, "quantization_config")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    with_adapter = PeftModel.from_pretrained(base, adapter)
    prompts = [_prompt(json.loads(line)) for line in (sharded.folder / "data" / "eval.jsonl").open()][:16]
    changed = 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = with_adapter.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
            got = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
            plain = with_adapter.get_base_model()
            with with_adapter.disable_adapter():
                untrained = plain.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        assert_same_greedy_tokens(got[0, len(prompt):].tolist(), want[0, len(prompt):].tolist(), with_adapter, prompt,
                                  {model.generation_config.eos_token_id})
        changed += got.tolist() != untrained.tolist()
    assert changed >= len(prompts) // 2  # the adapter changes what the model says

    gguf = tunerun("export", sharded.run_id, "--format", "gguf", "--quant", "f16", *storage, cwd=sharded.cwd,
                   env=sharded.env, timeout=900)
    assert gguf.returncode == 0, gguf.stdout + gguf.stderr
    check = json.loads((sharded.folder / "eval" / "exports" / "final-gguf-f16.json").read_text())
    assert check["prompts"] >= 16 and check["same_tokens"] + check["near_ties"] == check["prompts"]


def assert_same_greedy_tokens(got: list[int], wanted: list[int], with_adapter, prompt: list[int], stops: set[int]):
    """The merged model's greedy tokens are the adapter's, but where the adapter's first two choices are tied and the
    merged model took the second: the merge rounds base + adapter to bf16 once, the adapter adds its product at every
    step, and a tie may break either way without anything being wrong with the merge (the GGUF check's rule)."""
    from tunerun.trainer.export.gguf import _broke_a_tie, _runners_up

    if got != wanted:
        assert _broke_a_tie(got, wanted, _runners_up(with_adapter, prompt, wanted, "cpu"), stops), (got, wanted)


def test_dpo_continues_the_sharded_adapter_against_it_frozen(sharded_qlora, tunerun, tiny_model_dir):
    """Preference tuning under QLoRA + ZeRO-3 from this run's adapter (OpenAI's SFT-then-DPO flow as a 70B job runs
    it): the reference is that adapter loaded again, frozen, on the same partitioned 4-bit base."""
    sharded = sharded_qlora
    overrides = [f"model.path={tiny_model_dir}", f"storage.uri={sharded.storage}", "method.kind=qlora",
                 "method.zero={stage: 3}", "training.gradient_checkpointing=true", "training.max_steps=6",
                 f"model.adapter={sharded.folder / 'final' / 'adapter'}", "data.eval_fraction=0.04",
                 f"data.train={REPO / 'examples' / 'data' / 'support_preferences.jsonl'}",
                 "eval.every_steps=1000", "checkpoint.every_steps=1000", "eval.max_new_tokens=4"]
    result = tunerun("run", str(REPO / "jobs" / "examples" / "dpo.yaml"), *[a for o in overrides for a in ("--set", o)],
                     "--run-id", "sharded-dpo", cwd=sharded.cwd, env=sharded.env, timeout=900)
    folder = sharded.storage / "sharded-dpo"
    assert result.returncode == 0, result.stdout + result.stderr
    evals = [r for r in map(json.loads, (folder / "metrics.jsonl").open()) if "eval_reward_accuracy" in r]
    base, final = evals[0], evals[-1]
    print(f"\nQLoRA + ZeRO-3 DPO: reward accuracy {base['eval_reward_accuracy']:.2f} → "
          f"{final['eval_reward_accuracy']:.2f}, margin {final['eval_reward_margin']:.3f}")
    assert base["base"] and base["eval_reward_accuracy"] == 0.0  # the policy is its reference before a step
    assert base["eval_reward_margin"] == pytest.approx(0, abs=1e-4)
    assert final["step"] == 6 and final["eval_reward_margin"] > 0 and final["eval_reward_accuracy"] > 0.5
    assert json.loads((folder / "memory.json").read_text())["estimate"]["name"] == "QLoRA + ZeRO-3"
    adapter = folder / "final" / "adapter"  # the trained adapter alone, not the frozen reference beside it
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "reference").exists()


def test_resume_on_another_worker_count_is_refused(sharded_qlora, tunerun):
    sharded = sharded_qlora
    smaller = tunerun("run", str(QUICKSTART), *sharded.sets, "--set", f"training.max_steps={sharded.steps + 4}",
                      "--set", "resources.workers_per_node=1", "--resume", sharded.run_id, cwd=sharded.cwd,
                      env=sharded.env, timeout=300)
    assert smaller.returncode == 2, smaller.stdout + smaller.stderr
    assert "ZeRO shards of 2 workers" in smaller.stderr and "this launch has 1" in smaller.stderr
    assert "Traceback" not in smaller.stderr


def _prompt(example: dict) -> list[int]:
    return example["input_ids"][:next(i for i, label in enumerate(example["labels"]) if label != -100)]

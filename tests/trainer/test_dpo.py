"""Preference tuning (training.objective dpo): preference files as people have them become pairs, the pairs are
cleaned and cut to length as pairs, and the DPO loss on a real PEFT model moves the policy towards the chosen
answers while its reference (the adapters switched off) stays where it was."""
from __future__ import annotations

import json

import pytest
import torch

from tunerun.jobs.errors import DataError, SpecError
from tunerun.jobs.loader import load_job_text
from tunerun.jobs.plan import resolve
from tunerun.jobs.spec import CleanSpec, DataSpec
from tunerun.trainer.data.formats import detect_format, to_conversation
from tunerun.trainer.data.pipeline import prepare_data
from tunerun.trainer.data.render import IGNORE_INDEX
from tunerun.trainer.objectives import get_objective, objective_for
from tunerun.trainer.objectives.dpo import DirectPreference, answer_logps, reference_of

from test_engines import lora_engine

PROMPT = [{"role": "system", "content": "You answer support tickets."}, {"role": "user", "content": "My order is late"}]
POLITE, CURT = "We are sorry for the delay; your order ships today.", "It ships today."


def openai_pair(i: int, chosen: str = POLITE, rejected: str = CURT) -> dict:
    prompt = [*PROMPT[:1], {"role": "user", "content": f"Order {i} is late"}]
    return {"input": {"messages": prompt}, "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ── formats ─────────────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("record, fmt", [
    (openai_pair(1), "openai_preference"),
    ({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": POLITE}],
      "rejected": [{"role": "assistant", "content": CURT}]}, "trl_preference"),
    ({"system": PROMPT[0]["content"], "conversations": [{"from": "human", "value": PROMPT[1]["content"]}],
      "chosen": {"from": "gpt", "value": POLITE}, "rejected": {"from": "gpt", "value": CURT}}, "sharegpt_ranking"),
    ({"system": PROMPT[0]["content"], "instruction": PROMPT[1]["content"], "chosen": POLITE, "rejected": CURT},
     "alpaca_ranking"),
])
def test_each_preference_format_becomes_the_same_pair(record, fmt):
    assert detect_format(record) == fmt
    pair = to_conversation(record, fmt)
    prompt = [{"role": "system", "content": PROMPT[0]["content"]},
              {"role": "user", "content": "Order 1 is late" if fmt == "openai_preference" else PROMPT[1]["content"]}]
    assert pair.messages == [*prompt, {"role": "assistant", "content": POLITE}]
    assert pair.rejected_conversation().messages == [*prompt, {"role": "assistant", "content": CURT}]


def test_earlier_assistant_turns_of_a_prompt_are_context_and_bad_pairs_say_why():
    record = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "late order"}], "chosen": POLITE, "rejected": CURT}
    pair = to_conversation(record, "trl_preference")
    assert pair.messages[1] == {"role": "assistant", "content": "hello", "weight": 0}
    with pytest.raises(DataError, match="the rejected answer must be one or more assistant messages"):
        to_conversation({"prompt": "hi", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
                        "trl_preference")
    with pytest.raises(DataError, match="input must be an object with messages"):
        to_conversation({"input": "hi", "preferred_output": "a", "non_preferred_output": "b"}, "openai_preference")


# ── preparation ─────────────────────────────────────────────────────────────────────────────────────────────


def test_pairs_are_cleaned_deduplicated_and_counted_as_pairs(tmp_path, tokenizer):
    records = [openai_pair(i) for i in range(8)]
    records.append(openai_pair(0))  # the same pair again: a duplicate
    records.append(openai_pair(0, rejected="We are sorry for the delay; your order ships today."))  # equal answers
    records.append(openai_pair(0, rejected="Write to bob@example.com."))  # same prompt and chosen: not a copy
    # answers that differ only in an e-mail address are the same once it is masked: nothing to prefer
    records.append(openai_pair(99, chosen="Mail ann@example.com", rejected="Mail bob@example.com"))
    spec = DataSpec(train=write_jsonl(tmp_path / "pairs.jsonl", records), eval_fraction=0.0, max_seq_len=256,
                    clean=CleanSpec(near_dedup=False))
    prepared = prepare_data(spec, tokenizer, seed=0, objective=DirectPreference())
    report = prepared.report
    assert report.format == "openai_preference" and report.records_read == 12
    assert (report.duplicates, report.equal_answers, report.train_records) == (1, 2, 9)
    assert report.pii_masked["email"] == 1  # the kept pair's masked address
    example = prepared.train[0]
    chosen = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    rejected = tokenizer.decode([t for t in example["rejected_labels"] if t != IGNORE_INDEX])
    assert chosen.startswith(POLITE) and rejected.startswith(CURT)
    # the prompt is the same tokens in both
    start = example["labels"].index(next(t for t in example["labels"] if t != IGNORE_INDEX))
    assert example["input_ids"][:start] == example["rejected_input_ids"][:start]


def test_a_preference_file_for_sft_and_a_chat_file_for_dpo_are_refused_by_name(tmp_path, tokenizer):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [openai_pair(1)])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [*PROMPT, {"role": "assistant", "content": POLITE}]}])
    with pytest.raises(DataError, match="holds openai_preference records .* train with training.objective: dpo"):
        prepare_data(DataSpec(train=pairs, eval_fraction=0.0), tokenizer, seed=0)
    with pytest.raises(DataError, match="holds chat records .*objective dpo reads preference pairs .* set "
                                        "training.objective: sft"):
        prepare_data(DataSpec(train=chat, eval_fraction=0.0), tokenizer, seed=0, objective=DirectPreference())


def test_a_long_pair_loses_the_start_of_its_prompt_or_is_dropped():
    objective = DirectPreference()
    prompt, chosen, rejected = list(range(1, 11)), [50, 51, 52], [60, 61]
    example = {"input_ids": prompt + chosen, "labels": [IGNORE_INDEX] * 10 + chosen,
               "rejected_input_ids": prompt + rejected, "rejected_labels": [IGNORE_INDEX] * 10 + rejected}
    assert objective.fit(example, 13, "truncate") == (example, "kept")
    cut, verdict = objective.fit(example, 9, "truncate")
    assert verdict == "truncated" and cut["input_ids"] == [1, 6, 7, 8, 9, 10, 50, 51, 52]
    assert cut["rejected_input_ids"] == [1, 6, 7, 8, 9, 10, 60, 61] and cut["labels"][-3:] == chosen
    assert objective.fit(example, 9, "drop") == (None, "too_long")
    assert objective.fit(example, 3, "truncate") == (None, "too_long")  # the answers alone do not fit
    assert objective.length(example) == 13


# ── the spec ────────────────────────────────────────────────────────────────────────────────────────────────


def spec_text(model_dir, data, training: str, extra: str = "") -> str:
    return (f"model: {{path: {model_dir}}}\nmethod: {{kind: lora}}\ndata: {{train: {data}}}\n"
            f"training: {training}\n{extra}")


def test_the_spec_chooses_dpo_with_its_settings_and_refuses_what_it_cannot_do(stub_model_dir, tmp_path):
    data = tmp_path / "t.jsonl"
    job = load_job_text(spec_text(stub_model_dir, data, "{objective: dpo}"))
    assert job.training.dpo.beta == 0.1 and job.training.dpo.nll_weight == 1.0
    chosen = objective_for(job)
    assert isinstance(chosen, DirectPreference) and (chosen.beta, chosen.nll_weight) == (0.1, 1.0)
    assert "reward_accuracy" in job.computed_metrics() and "perplexity" not in job.computed_metrics()
    best = load_job_text(spec_text(stub_model_dir, data, "{objective: dpo}",
                                   "checkpoint: {keep_best: 1, best_metric: reward_accuracy, every_steps: 100}\n"
                                   "eval: {every_steps: 100}\n"))
    assert best.checkpoint.best_metric == "reward_accuracy"
    tuned = load_job_text(spec_text(stub_model_dir, data, "{objective: dpo, dpo: {beta: 0.5, nll_weight: 0}}"))
    assert (objective_for(tuned).beta, objective_for(tuned).nll_weight) == (0.5, 0.0)
    assert load_job_text(spec_text(stub_model_dir, data, "{objective: sft}")).training.dpo is None
    for training, extra, path, message in [
        ("{dpo: {beta: 0.2}}", "", "training.dpo", "applies to objective dpo"),
        ("{objective: dpo}", "", None, None),
        ("{objective: dpo, dpo: {beta: 0}}", "", "training.dpo.beta", "must be > 0"),
        ("{objective: dpo}", "eval: {gates: {reward_accuracy: '>= 0.9'}}", None, None),
        ("{objective: sft}", "eval: {gates: {reward_accuracy: '>= 0.9'}}", "eval.gates.reward_accuracy",
         "measured on held-out preference pairs, not by training.objective sft"),
    ]:
        text = spec_text(stub_model_dir, data, training, extra)
        if path is None:
            load_job_text(text)
            continue
        with pytest.raises(SpecError) as caught:
            load_job_text(text)
        assert caught.value.problems[0].path == path and message in caught.value.problems[0].message
    packing = spec_text(stub_model_dir, data, "{objective: dpo}").replace("data: {train:",
                                                                        "data: {packing: true, train:")
    with pytest.raises(SpecError, match="cannot pack examples .*set data.packing: false"):
        load_job_text(packing)
    full = spec_text(stub_model_dir, data, "{objective: dpo}").replace("{kind: lora}", "{kind: full}")
    assert load_job_text(full).method.kind == "full"  # its reference is precomputed (attach_reference)


# ── the loss ────────────────────────────────────────────────────────────────────────────────────────────────


class FixedLogits(torch.nn.Module):
    """A "model" whose logits are given, with PEFT's ``disable_adapter`` switching to the reference's logits."""

    def __init__(self, policy: torch.Tensor, reference: torch.Tensor):
        super().__init__()
        self.policy, self.reference, self.adapters_on = policy, reference, True

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": self.policy if self.adapters_on else self.reference})()

    def disable_adapter(self):
        from contextlib import contextmanager

        @contextmanager
        def off():
            self.adapters_on = False
            yield
            self.adapters_on = True
        return off()


def test_the_loss_is_the_dpo_paper_s_plus_the_chosen_answer_s_token_mean_nll():
    """On fixed logits, against the formulas written out as TRL computes them (sigmoid loss, rpo_alpha NLL)."""
    torch.manual_seed(0)
    pairs, length, vocab, beta, alpha = 3, 7, 11, 0.3, 0.5
    policy, reference = torch.randn(2 * pairs, length, vocab), torch.randn(2 * pairs, length, vocab)
    labels = torch.randint(0, vocab, (2 * pairs, length))
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[1, 5:] = IGNORE_INDEX  # a shorter answer
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels), "labels": labels}

    def logps(logits):  # per row: sum of log p(label) over the answer's tokens, predicted one position earlier
        logprobs = logits[:, :-1].log_softmax(-1)
        target = labels[:, 1:]
        mask = target != IGNORE_INDEX
        return (logprobs.gather(2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1), mask

    pi, mask = logps(policy)
    ref, _ = logps(reference)
    logits = beta * ((pi[:pairs] - ref[:pairs]) - (pi[pairs:] - ref[pairs:]))
    dpo = -torch.nn.functional.logsigmoid(logits).mean()
    nll = torch.nn.functional.cross_entropy(policy[:pairs, :-1].reshape(-1, vocab), labels[:pairs, 1:].reshape(-1),
                                            ignore_index=IGNORE_INDEX)  # token mean over the chosen answers
    model = FixedLogits(policy, reference)
    assert float(DirectPreference(beta, alpha).loss(model, batch)) == pytest.approx(float(dpo + alpha * nll), rel=1e-5)
    assert float(DirectPreference(beta, 0.0).loss(model, batch)) == pytest.approx(float(dpo), rel=1e-5)
    metrics = DirectPreference(beta, alpha).held_out_metrics(DirectPreference(beta, alpha).score(model, batch))
    assert tuple(metrics) == DirectPreference.held_out  # the names the spec's gates and best_metric accept
    assert metrics["reward_accuracy"] == pytest.approx(float((logits > 0).float().mean()))
    assert metrics["reward_margin"] == pytest.approx(float(logits.mean()), rel=1e-5)
    assert metrics["chosen_logp"] == pytest.approx(float(pi[:pairs].mean()), rel=1e-5)
    assert metrics["rejected_logp"] == pytest.approx(float(pi[pairs:].mean()), rel=1e-5)


# ── the loss on a real model ────────────────────────────────────────────────────────────────────────────────


def test_dpo_steps_prefer_the_chosen_answers_and_leave_the_reference_alone(tiny_model_dir, tmp_path, tokenizer,
                                                                          one_worker_context):
    records = [openai_pair(i) for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    job = resolve(load_job_text(
        f"model: {{path: {tiny_model_dir}, dtype: float32}}\nmethod: {{kind: lora, lora: {{dropout: 0.0}}}}\n"
        f"data: {{train: {data}, eval_fraction: 0.0}}\ntraining: {{objective: dpo, learning_rate: 0.01, "
        "warmup_ratio: 0.0, micro_batch_size: 4, global_batch_size: 4}\nresources: {workers_per_node: 1}\n"),
        run_id="dpo")
    examples = prepare_data(job.spec.data, tokenizer, seed=0, objective=objective_for(job.spec)).train
    torch.manual_seed(0)
    engine = lora_engine(job, total_steps=6)
    objective = engine.objective
    batch = objective.collate(examples[:4], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 8 and objective.tokens(batch) == int(batch["attention_mask"].sum())

    def reference_logps():
        with torch.no_grad(), reference_of(engine.model) as reference:
            return answer_logps(reference(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).logits, batch["labels"])[0]

    before = engine.eval_batch(batch)
    reference = reference_logps()
    # fresh LoRA (B = 0) is the reference: every reward is 0, the loss is log 2 plus the chosen answers' NLL
    assert before[1] == 4 and before[3] == pytest.approx(0.0, abs=1e-5)
    losses = [engine.train_step([objective.collate(examples[i:i + 4], tokenizer.pad_token_id)]) for i in (0, 4) * 3]
    after = objective.held_out_metrics(engine.eval_batch(batch))
    assert losses[-1] < losses[0], losses
    assert after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0 and after["loss"] < before[0] / 4
    assert torch.equal(reference_logps(), reference)  # the adapters were off: the reference never moved


def test_without_adapters_the_reference_must_come_with_the_batch():
    with pytest.raises(RuntimeError, match="without adapters reads its reference from the examples"):
        with reference_of(torch.nn.Linear(2, 2)):
            pass
    assert get_objective("dpo").activation_sequences == 2 and not get_objective("dpo").packs


# ── a full fine-tune: the reference computed once, before training ─────────────────────────────────────────


def test_a_full_fine_tune_scores_against_the_untrained_models_stored_log_probabilities(tiny_model_dir, tmp_path,
                                                                                      tokenizer):
    import copy

    from transformers import AutoModelForCausalLM

    from tunerun.cluster.run_folder import REFERENCE_LOGPS, RunFolder
    from tunerun.jobs.spec import StorageSpec
    from tunerun.trainer.engines import EvalOnlyEngine
    from tunerun.trainer.objectives.dpo import REFERENCE_BATCH

    data = write_jsonl(tmp_path / "pairs.jsonl", [openai_pair(i) for i in range(10)])
    spec = DataSpec(train=data, eval_fraction=0.3)
    prepared = prepare_data(spec, tokenizer, seed=0, objective=DirectPreference())
    run = RunFolder(StorageSpec(uri=str(tmp_path / "runs")), "full-dpo")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    untrained = copy.deepcopy(model).eval()
    objective, engine = DirectPreference(beta=0.5), EvalOnlyEngine(model, torch.device("cpu"), DirectPreference())
    sets = {"train": prepared.train, "eval": prepared.eval}
    done = objective.attach_reference(engine, sets, run, tokenizer.pad_token_id, 3, untrained=True)
    assert done["source"] == "computed" and run.exists(REFERENCE_LOGPS)
    assert done["pairs"] == len(prepared.train) + len(prepared.eval) and prepared.eval
    batch = objective.collate(prepared.train[:4], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = answer_logps(untrained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])[0]
    assert torch.allclose(batch[REFERENCE_BATCH], expected, atol=1e-4)  # chosen, then rejected, as the rows
    before = objective.held_out_metrics(objective.score(model.eval(), batch))
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-4) and before["reward_accuracy"] == 0.0

    with torch.no_grad():  # "training" moves the model; the reference stays the untrained model's
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    policy = answer_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                          batch["labels"])
    rewards = 0.5 * (policy[0] - expected)
    formula = -torch.nn.functional.logsigmoid(rewards[:4] - rewards[4:]).mean() - policy[0][:4].sum() / policy[1][
        :4].sum()
    assert float(objective.loss(model, batch)) == pytest.approx(float(formula), rel=1e-4)

    # a resumed launch (or `tunerun eval`) reads the stored table, though the model has moved on
    again = prepare_data(spec, tokenizer, seed=0, objective=DirectPreference())
    assert objective.attach_reference(engine, {"eval": again.eval}, run, tokenizer.pad_token_id, 3,
                                      untrained=False)["source"] == "stored"
    assert [e["reference_logp"] for e in again.eval] == [e["reference_logp"] for e in prepared.eval]
    other = prepare_data(DataSpec(train=write_jsonl(tmp_path / "other.jsonl", [openai_pair(i, CURT, POLITE)
                                                                              for i in range(10)]), eval_fraction=0.3),
                         tokenizer, seed=0, objective=DirectPreference())
    with pytest.raises(DataError, match="reference log-probabilities .* missing or were computed for other data"):
        objective.attach_reference(engine, {"eval": other.eval}, run, tokenizer.pad_token_id, 3, untrained=False)
    from peft import LoraConfig, get_peft_model

    adapters = EvalOnlyEngine(get_peft_model(untrained, LoraConfig(target_modules=["q_proj"])), torch.device("cpu"),
                              objective)
    assert objective.attach_reference(adapters, {"eval": other.eval}, run, 0, 3, untrained=False) is None


# ── starting from a supervised fine-tune ────────────────────────────────────────────────────────────────────


def sft_adapter(tiny_model_dir, folder, r: int = 8):
    """A LoRA adapter that changes the model (PEFT initialises B to 0: these are random), as an SFT run leaves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return model


def test_dpo_from_an_adapter_trains_a_copy_and_compares_with_the_frozen_original(tiny_model_dir, tmp_path, tokenizer,
                                                                                 one_worker_context):
    sft = sft_adapter(tiny_model_dir, tmp_path / "sft")
    data = write_jsonl(tmp_path / "pairs.jsonl", [openai_pair(i) for i in range(8)])
    job = resolve(load_job_text(
        f"model: {{path: {tiny_model_dir}, adapter: {tmp_path / 'sft'}, dtype: float32}}\n"
        f"method: {{kind: lora, lora: {{dropout: 0.0}}}}\ndata: {{train: {data}, eval_fraction: 0.0}}\n"
        "training: {objective: dpo, learning_rate: 0.01, warmup_ratio: 0.0, micro_batch_size: 4, "
        "global_batch_size: 4}\nresources: {workers_per_node: 1}\n"), run_id="dpo")
    lora = job.spec.method.lora  # the adapter's shape, not the spec's defaults
    assert (lora.r, lora.alpha, lora.target_modules) == (8, 16, ["q_proj", "v_proj"])
    examples = prepare_data(job.spec.data, tokenizer, seed=0, objective=objective_for(job.spec)).train
    engine = lora_engine(job, total_steps=4)
    objective, batch = engine.objective, engine.objective.collate(examples[:4], tokenizer.pad_token_id)
    trained = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    assert trained and all(".default." in n for n in trained)

    def logps(model):
        with torch.no_grad():
            return answer_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])[0]

    with reference_of(engine.model) as reference:
        at_start = logps(reference)
    assert torch.allclose(at_start, logps(sft.eval()), atol=1e-4)  # the reference is the SFT model, not the base
    with engine.model.disable_adapter():
        assert not torch.allclose(at_start, logps(engine.model), atol=1e-2)
    loss, pairs, right, margin, *_ = engine.eval_batch(batch)
    assert margin == pytest.approx(0.0, abs=1e-4)  # the trained copy starts where the reference is
    for i in (0, 4, 0, 4):
        engine.train_step([objective.collate(examples[i:i + 4], tokenizer.pad_token_id)])
    with reference_of(engine.model) as reference:
        assert torch.equal(logps(reference), at_start)
    assert objective.held_out_metrics(engine.eval_batch(batch))["reward_accuracy"] == 1.0
    assert {n for n, p in engine.module.named_parameters() if p.requires_grad} == trained
    from tunerun.trainer.methods import get_method

    out = get_method("lora").export(engine, tmp_path / "final", tokenizer)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "reference").exists()


def test_a_starting_adapter_must_be_a_lora_adapter_and_not_for_a_full_fine_tune(stub_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [openai_pair(1)])
    text = (f"model: {{path: {stub_model_dir}, adapter: {tmp_path / 'nope'}}}\nmethod: {{kind: %s}}\n"
            f"data: {{train: {data}}}\n")
    with pytest.raises(SpecError) as caught:
        resolve(load_job_text(text % "lora"))
    assert caught.value.problems[0].path == "model.adapter" and "is not a PEFT adapter folder" in str(caught.value)
    with pytest.raises(SpecError, match="a full fine-tune trains every weight"):
        load_job_text(text % "full")

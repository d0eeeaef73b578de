"""Generation-based evaluation: prompts and references from tokenized examples, the metrics, greedy generation on
the tiny Llama (batched, sharded across two real gloo processes), gates, the forgetting sample, and the spec."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunerun.jobs.errors import DataError, SpecError
from tunerun.jobs.loader import load_job_text
from tunerun.trainer.data.render import IGNORE_INDEX as IGNORE
from tunerun.trainer.evaluation import generation, metrics, records

SPEC = "model: {path: /m}\ndata: {train: /d.jsonl}\n"


# ── prompt / reference split ────────────────────────────────────────────────────────────────────────────────


def test_prompt_is_everything_before_the_final_assistant_turn():
    single = {"input_ids": [1, 5, 6, 7, 8, 2], "labels": [IGNORE, IGNORE, IGNORE, 7, 8, 2]}
    assert generation.split_example(single) == ([1, 5, 6], [7, 8, 2])
    # two assistant turns: the earlier answer belongs to the prompt, as the model saw it in training
    multi = {"input_ids": [1, 5, 10, 11, 6, 20, 21, 9],
             "labels": [IGNORE, IGNORE, 10, 11, IGNORE, 20, 21, IGNORE]}
    assert generation.split_example(multi) == ([1, 5, 10, 11, 6], [20, 21])


def test_examples_without_labels_or_prompt_are_not_generated():
    examples = [{"input_ids": [1, 2], "labels": [IGNORE, IGNORE]},
                {"input_ids": [1, 2], "labels": [1, 2]},
                {"input_ids": [1, 5, 2], "labels": [IGNORE, 5, 2]}]
    items = generation.eval_items(examples, max_examples=10)
    assert [it.index for it in items] == [2]
    assert len(generation.eval_items([examples[2]] * 50, max_examples=7)) == 7


# ── metrics ─────────────────────────────────────────────────────────────────────────────────────────────────


def test_squad_normalisation_exact_match_and_f1():
    assert metrics.normalize_answer("The  Cat, sat!") == "cat sat"
    assert metrics.exact_match("category: Refund.", "category: refund") == 1.0
    assert metrics.exact_match("category: billing", "category: refund") == 0.0
    assert metrics.token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 1))
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("x", "") == 0.0


def test_rouge_l_uses_rouge_score_and_keeps_non_ascii_words():
    assert metrics.rouge_l(["category: refund please"], ["category: refund"]) == [pytest.approx(0.8)]
    # rouge-score's default tokenizer would drop these words entirely and score 0
    assert metrics.rouge_l(["Ölçüm başarılı"], ["ölçüm başarılı"]) == [pytest.approx(1.0)]


def test_label_accuracy_from_the_pattern_and_none_when_nothing_matches():
    preds = ["category: billing", "category: login\nthanks", "I think it is billing"]
    refs = ["category: billing", "category: refund", "category: billing"]
    scores = metrics.score(preds, refs, ["exact_match"], label_pattern=r"^category: (\w+)")
    assert scores["label_accuracy"] == pytest.approx(1 / 3) and scores["exact_match"] == pytest.approx(1 / 3)
    assert metrics.score(preds, refs, [], label_pattern=r"^label=(\w+)")["label_accuracy"] is None


# ── gates ───────────────────────────────────────────────────────────────────────────────────────────────────


def test_gates_pass_fail_and_an_unmeasured_metric_fails():
    spec = load_job_text(SPEC + "eval:\n  label_pattern: 'x(y)'\n  gates:\n    exact_match: '>= 0.8'\n"
                                "    forgetting_drop: '<= 0.05'\n    label_accuracy: '> 0.5'\n").eval
    result = records.apply_gates(spec, {"exact_match": 0.9, "forgetting_drop": 0.2, "label_accuracy": None})
    assert not result["passed"]
    assert [(r["metric"], r["passed"]) for r in result["results"]] == [
        ("exact_match", True), ("forgetting_drop", False), ("label_accuracy", False)]
    assert result["results"][0]["condition"] == ">= 0.8"
    assert records.apply_gates(spec, {"exact_match": 0.8, "forgetting_drop": 0.05, "label_accuracy": 0.6})["passed"]


def test_forgetting_drop_is_base_minus_final_on_the_general_sample():
    spec = load_job_text(SPEC + "eval: {forgetting_metric: f1, forgetting_threshold: 0.1}\n").eval
    base, final = {"general": {"f1": 0.5}}, {"general": {"f1": 0.3}}
    assert records.forgetting(spec, base, final) == {"forgetting_drop": pytest.approx(0.2), "forgetting_flagged": True}
    assert records.forgetting(spec, None, final) == {}


def test_gates_on_eval_metrics_need_an_eval_set():
    spec = load_job_text(SPEC + "eval: {gates: {exact_match: '>= 0.5'}}\n").eval
    with pytest.raises(DataError, match="eval.gates on exact_match need an evaluation set"):
        records.require_eval_set(spec, "data/eval.jsonl holds no examples")
    records.require_eval_set(load_job_text(SPEC + "eval: {gates: {forgetting_drop: '<= 0.1'}}\n").eval, "none")


# ── the spec ────────────────────────────────────────────────────────────────────────────────────────────────


def problems_of(text: str) -> str:
    with pytest.raises(SpecError) as info:
        load_job_text(text)
    return str(info.value)


def test_spec_defaults():
    spec = load_job_text(SPEC).eval
    assert spec.max_new_tokens == 64 and spec.max_examples == 200 and spec.general == "default"
    assert spec.computed_metrics() == ["exact_match", "f1", "rouge_l", "loss", "perplexity", "forgetting_drop"]


def test_every_bad_gate_is_reported_at_once_naming_the_gate():
    text = SPEC + ("eval:\n  metrics: [loss, exact_match]\n  general: null\n  gates:\n"
                   "    exact_matc: '>= 0.8'\n    rouge_l: '>= 0.2'\n    exact_match: '=> 0.8'\n"
                   "    forgetting_drop: '<= 0.05'\n    loss: 0.3\n")
    message = problems_of(text)
    assert "5 problems" in message
    assert "eval.gates.exact_matc: unknown metric 'exact_matc' — did you mean 'exact_match'?" in message
    assert "eval.gates.rouge_l: metric 'rouge_l' is not computed by this job: add rouge_l to eval.metrics" in message
    assert "eval.gates.exact_match: expected a comparison such as '>= 0.8'" in message and "'=> 0.8'" in message
    assert "eval.gates.forgetting_drop: metric 'forgetting_drop' is not computed" in message
    assert "eval.gates.loss: expected a comparison" in message  # a bare number has no direction
    assert "line 7 " in message and "line 11" in message  # each problem points at its own line


def test_unknown_metric_name_bad_pattern_and_missing_general_file(tmp_path):
    message = problems_of(SPEC + "eval:\n  metrics: [loss, exact_macth]\n  label_pattern: '(unclosed'\n"
                                 f"  general: {tmp_path}/nope.jsonl\n")
    assert "eval.metrics.1" in message and "did you mean 'exact_match'" in message
    assert "eval.label_pattern: not a valid regular expression" in message
    assert "eval.general" in message and "does not exist" in message
    assert "label_accuracy needs eval.label_pattern" in problems_of(SPEC + "eval: {metrics: [label_accuracy]}\n")


def test_general_path_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "general.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert load_job_text(SPEC + "eval: {general: general.jsonl}\n").eval.general == str(tmp_path / "general.jsonl")


# ── generation on the tiny model ────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny):
    import torch

    model, tokenizer = tiny
    prompts = [tokenizer(t)["input_ids"] for t in ["Hello team, my invoice", "I can't log in", "Refund please for"]]
    batched = generation.generate(model, tokenizer, prompts, 8, torch.device("cpu"))
    single = [generation.generate(model, tokenizer, [p], 8, torch.device("cpu"))[0] for p in prompts]
    assert batched == single and all(0 < len(out) <= 8 for out in batched)
    # lockstep pads with stand-in batches (ZeRO-3 needs equal generate calls) but returns only real outputs
    assert generation.generate(model, tokenizer, prompts[:1], 8, torch.device("cpu"), calls=3) == single[:1]


def test_generation_stops_at_eos(tiny):
    import torch

    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    assert generation._until_stop([5, 6, eos, 7], [eos]) == [5, 6]
    with torch.no_grad():  # make EOS the only reachable token: the output is empty
        saved = model.lm_head.weight.clone()
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos] = 1.0
        try:
            out = generation.generate(model, tokenizer, [[1, 50, 60]], 8, torch.device("cpu"))
        finally:
            model.lm_head.weight.copy_(saved)
    assert out == [[]]


def test_bundled_general_sample_is_tokenized_like_training_data(tiny):
    from tunerun.jobs.spec import EvalSpec

    _, tokenizer = tiny
    examples = generation.load_general_set(EvalSpec(), 256, tokenizer)
    assert len(examples) >= 30
    prompt, reference = generation.split_example(examples[0])
    assert tokenizer.decode(prompt).endswith("<|assistant|>\n")  # tunerun's default template, as in training
    assert generation.decode(tokenizer, reference) == "5"
    lines = Path(generation.GENERAL_DEFAULT).read_text().splitlines()
    assert all(json.loads(line)["messages"][-1]["role"] == "assistant" for line in lines)


def _sharded_worker(rank: int, world: int, port: int, model_dir: str, out_dir: str, lockstep: bool) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    items = [generation.EvalItem(i, tokenizer(f"ticket {i} about my invoice")["input_ids"], [5]) for i in range(5)]
    outputs = generation.generate_sharded(model, tokenizer, items, 6, torch.device("cpu"), lockstep=lockstep)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outputs))
    dist.barrier()
    # Tearing gloo down while the peer process exits can abort in C++ ("terminate called without an active
    # exception", seen under load in CI); both ranks are done here, so leave without teardown.
    os._exit(0)


@pytest.mark.parametrize("lockstep", [False, True])
def test_two_ranks_generate_their_shards_and_both_get_every_output(tiny_model_dir, tmp_path, tiny, lockstep,
                                                                    free_port):
    """Real torch.distributed (gloo, 2 processes): 5 examples split 3/2; all_gather_object gives each rank all."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, free_port(), str(tiny_model_dir), str(tmp_path), lockstep), nprocs=2)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and sorted(map(int, rank0)) == [0, 1, 2, 3, 4]
    model, tokenizer = tiny
    items = [generation.EvalItem(i, tokenizer(f"ticket {i} about my invoice")["input_ids"], [5]) for i in range(5)]
    alone = generation.generate_sharded(model, tokenizer, items, 6, torch.device("cpu"))
    assert {int(k): v for k, v in rank0.items()} == alone


# ── on demand: a run without an eval set is a clear error ───────────────────────────────────────────────────


def test_evaluate_run_refuses_a_missing_or_empty_eval_set(tmp_path, tiny_model_dir):
    import yaml

    from tunerun.cluster.storage import RunFolder
    from tunerun.jobs.plan import resolve
    from tunerun.trainer.evaluation.on_demand import evaluate_run

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    job = resolve(load_job_text(f"model: {{path: {tiny_model_dir}}}\ndata: {{train: {data}}}\n"), run_id="r1")
    run = RunFolder(str(tmp_path / "runs"), "r1")
    run.write_text("job.yaml", yaml.safe_dump(job.model_dump(mode="json")))
    with pytest.raises(DataError, match="data/eval.jsonl is missing"):
        evaluate_run(run, job, None)
    run.write_text("data/eval.jsonl", "")
    with pytest.raises(DataError, match="data/eval.jsonl holds no examples"):
        evaluate_run(run, job, None)


@pytest.fixture(autouse=True)
def _no_accelerator_warnings(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "false"))

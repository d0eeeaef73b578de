"""Generation-based evaluation: prompts and references from tokenized examples, greedy generation on the tiny
Llama (batched, sharded across two real gloo processes), and the bundled general-instructions sample."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunerun.trainer.data.render import IGNORE_INDEX as IGNORE
from tunerun.trainer.evaluation import generation


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


def test_the_generation_batch_size_sets_the_generate_calls_not_the_outputs(tiny, monkeypatch):
    """eval.generation_batch_size: fewer, larger calls (fewer ZeRO-3 gathers), the same greedy outputs."""
    import torch

    model, tokenizer = tiny
    prompts = [tokenizer(f"ticket {i} about my invoice")["input_ids"] for i in range(5)]
    calls, original = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(len(kw["input_ids"])) or original(**kw))
    by_two = generation.generate(model, tokenizer, prompts, 6, torch.device("cpu"), batch=2)
    assert calls == [2, 2, 1]
    calls.clear()
    assert generation.generate(model, tokenizer, prompts, 6, torch.device("cpu"), batch=32) == by_two
    assert calls == [5]


def test_generation_stops_at_eos(tiny):
    import torch

    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    assert generation._until_stop([5, 6, eos, 7], [eos]) == [5, 6]
    # make EOS the only reachable token, whatever the hidden state: the output is empty
    only_eos = model.lm_head.register_forward_hook(
        lambda module, inputs, logits: torch.full_like(logits, -1e4).index_fill_(-1, torch.tensor([eos]), 1e4))
    try:
        out = generation.generate(model, tokenizer, [[1, 50, 60]], 8, torch.device("cpu"))
    finally:
        only_eos.remove()
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


@pytest.fixture(autouse=True)
def _no_accelerator_warnings(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "false"))

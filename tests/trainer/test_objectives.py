"""Training objectives: the spec names one (``training.objective``, ``sft`` unless it says otherwise), supervised
fine-tuning prepares, batches, scores and reports exactly what the data modules and the model's own loss do, and
an objective registered beside it drives data preparation (`PromptAndReply` below: examples of its own shape,
never packed), the engine, the held-out evaluation and the memory planner (`SummedNextToken`) without a change to
any of them."""
from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
import yaml

import tunerun.trainer.data.pipeline as pipeline
from tunerun.jobs.errors import DataError, Problem, SpecError
from tunerun.jobs.loader import load_job_text
from tunerun.jobs.plan import resolve
from tunerun.jobs.spec import CleanSpec, DataSpec, JobSpec, TrainingSpec
from tunerun.trainer.data.cache import content_hash, prepare_to_folder
from tunerun.trainer.data.formats import FORMATS, to_conversation
from tunerun.trainer.data.pack import ExampleWriter, Packer
from tunerun.trainer.data.render import IGNORE_INDEX, encode, render
from tunerun.trainer.evaluation.loss import held_out_loss
from tunerun.trainer.objectives import OBJECTIVES, Objective, get_objective, objective_for
from tunerun.trainer.objectives.sft import SupervisedFineTuning

from test_engines import examples, job_for, lora_engine

PADDED = [{"input_ids": [1, 5, 6, 7], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 7]},
          {"input_ids": [1, 8], "labels": [IGNORE_INDEX, 8]}]
PACKED = [{"input_ids": [1, 5, 1, 7], "labels": [IGNORE_INDEX, 5, IGNORE_INDEX, 7], "position_ids": [0, 1, 0, 1]},
          {"input_ids": [1, 9, 4], "labels": [IGNORE_INDEX, 9, 4], "position_ids": [0, 1, 2]}]


class SummedNextToken:
    """A second objective, for the seam: batches under keys of its own ("tokens", "weights"), the *summed*
    cross-entropy of the trained tokens as the loss, and a held-out metric supervised fine-tuning has not."""

    NAME = "summed next-token loss"
    KEY = "summed"
    formats = FORMATS
    packing_refusal = ""
    compares_with_reference = False
    held_out = ("loss", "loss_per_batch")
    activation_sequences = 3

    @classmethod
    def from_spec(cls, spec):
        return cls()

    def collate(self, examples: list[dict], pad_token_id: int) -> dict:
        width = max(len(ex["input_ids"]) for ex in examples)
        tokens = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        weights = torch.zeros((len(examples), width))
        for row, ex in enumerate(examples):
            tokens[row, :len(ex["input_ids"])] = torch.tensor(ex["input_ids"])
            weights[row, :len(ex["labels"])] = torch.tensor([float(label != IGNORE_INDEX) for label in ex["labels"]])
        return {"tokens": tokens, "weights": weights}

    def tokens(self, batch: dict) -> int:
        return int((batch["weights"] > 0).sum())

    def loss(self, forward, batch: dict) -> torch.Tensor:
        # Causal attention: the right padding cannot change the logits of the tokens before it.
        logits = forward(input_ids=batch["tokens"]).logits[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
        return (nll * batch["weights"][:, 1:]).sum()

    def score(self, forward, batch: dict) -> tuple[float, ...]:
        return float(self.loss(forward, batch)), float(batch["weights"][:, 1:].sum()), 1.0

    def held_out_metrics(self, sums: tuple[float, ...]) -> dict[str, float]:
        loss, tokens, batches = sums
        return {"loss": loss / tokens, "loss_per_batch": loss / batches}


class PromptAndReply:
    """A second objective, for data preparation, shaped as preference tuning's will be: an example keeps the
    prompt's and the reply's tokens apart under keys of its own, is never packed, and is dropped when too long
    whatever data.too_long says."""

    NAME = "prompt and reply"
    KEY = "prompt_reply"
    formats = FORMATS
    packing_refusal = "a prompt and a reply kept apart"
    compares_with_reference = False
    held_out = ("loss", "perplexity")
    activation_sequences = 1
    packs = False

    @classmethod
    def from_spec(cls, spec):
        return cls()

    def render(self, conversation, tokenizer) -> tuple[str, str]:
        *before, last = conversation.messages
        if last["role"] != "assistant":
            raise DataError("the last turn must be the assistant's")
        return "\n".join(m["content"] for m in before), last["content"]

    def encode(self, rendered: list, tokenizer) -> list[dict]:
        return [{"prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
                 "reply_ids": tokenizer(reply, add_special_tokens=False)["input_ids"]} for prompt, reply in rendered]

    def fit(self, example: dict, max_len: int, too_long: str) -> tuple[dict | None, str]:
        return (example, "kept") if self.length(example) <= max_len else (None, "too_long")

    def length(self, example: dict) -> int:
        return len(example["prompt_ids"]) + len(example["reply_ids"])


@pytest.fixture
def summed_objective(monkeypatch):
    """`SummedNextToken` registered as ``summed`` (a job chooses it with `choosing`)."""
    monkeypatch.setitem(OBJECTIVES, "summed", SummedNextToken)


@pytest.fixture
def prompt_and_reply(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "prompt_reply", PromptAndReply)


def choosing(job, name: str):
    """``job`` (resolved) training with the objective registered as ``name``. The spec admits only the shipped
    objectives (a new one adds its name there); `model_copy` skips that check, as a registered name would pass it."""
    training = job.spec.training.model_copy(update={"objective": name})
    return job.model_copy(update={"spec": job.spec.model_copy(update={"training": training})})


def chat(*turns: str) -> dict:
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


RECORDS = [chat("Where is my parcel?", "It left the depot this morning and arrives tomorrow."),
           chat("Can I change the delivery address?", "Yes: open the order and choose a new address."),
           {"messages": [{"role": "system", "content": "Answer in one sentence."},
                         {"role": "user", "content": "Are returns free?"},
                         {"role": "assistant", "content": "Yes, within thirty days of delivery."}]},
           chat("Hello", "Hi! How can I help?", "My invoice is missing.", "I have sent it to you again."),
           chat("Tell me everything about the warranty terms and conditions please",
                "The warranty covers manufacturing faults for two years from the date of purchase, not damage "
                "from drops, water or repairs made elsewhere; keep the receipt as the proof of purchase.")]


def token_mean_cross_entropy(model, batch: dict) -> float:
    """Next-token cross-entropy averaged over the labelled tokens, from the logits, by hand."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                 ignore_index=IGNORE_INDEX))


# ── the registry ───────────────────────────────────────────────────────────────────────────────────────────


def test_a_job_trains_with_supervised_fine_tuning_and_unknown_names_are_refused():
    assert list(OBJECTIVES) == ["sft", "dpo"]
    chosen = objective_for(None)
    assert isinstance(chosen, SupervisedFineTuning) and isinstance(chosen, Objective)
    assert chosen.activation_sequences == 1 and chosen.packs
    assert pickle.loads(pickle.dumps(chosen)).packs  # data preparation sends it to its worker processes
    with pytest.raises(ValueError, match="unknown objective 'ppo'; known: sft, dpo"):
        get_objective("ppo")


def test_the_spec_names_the_objective_sft_by_default(stub_model_dir, tmp_path):
    """A job.yaml written before ``training.objective`` existed still loads (and trains with sft); the field
    survives a dump; the spec's choices are the registry's names."""
    minimal = f"model: {{path: {stub_model_dir}}}\ndata: {{train: {tmp_path / 't.jsonl'}}}\n"
    before = load_job_text(minimal)
    assert before.training.objective == "sft" and isinstance(objective_for(before), SupervisedFineTuning)
    assert load_job_text(minimal + "training: {objective: sft}\n") == before
    dumped = yaml.safe_dump(before.model_dump(mode="json"), sort_keys=False)
    assert "objective: sft" in dumped and JobSpec.model_validate(yaml.safe_load(dumped)) == before
    assert get_args(TrainingSpec.model_fields["objective"].annotation) == tuple(OBJECTIVES)


def test_an_unknown_objective_is_refused_naming_the_field_and_the_choices(stub_model_dir, tmp_path):
    text = f"model: {{path: {stub_model_dir}}}\ndata: {{train: {tmp_path / 't.jsonl'}}}\ntraining:\n  objective: %s\n"
    for written, message in [("rlhf", "expected one of sft, dpo (got 'rlhf')"),
                             ("sfft", "expected one of sft, dpo (got 'sfft') — did you mean 'sft'?")]:
        with pytest.raises(SpecError) as caught:
            load_job_text(text % written, "job.yaml")
        assert caught.value.problems == [Problem("training.objective", message, 4)]
        assert f"line 4     training.objective: {message}" in str(caught.value)


def test_objectives_and_the_planner_that_reads_them_load_no_training_stack():
    """The planner asks the objective for its memory factor: importing every objective must not load torch."""
    code = ("import json, sys\nfrom tunerun.trainer.objectives import OBJECTIVES, get_objective\n"
            "factors = {name: get_objective(name).activation_sequences for name in OBJECTIVES}\n"
            "import tunerun.jobs.memory\n"
            "print(json.dumps([factors, sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'ray', 'deepspeed', 'peft'))]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"sft": 1, "dpo": 2}, []]


# ── supervised fine-tuning ──────────────────────────────────────────────────────────────────────────────────


def test_sft_collates_padded_examples_with_a_mask_and_packed_rows_with_position_ids():
    sft = get_objective("sft")
    padded = sft.collate(PADDED, pad_token_id=3)
    assert sorted(padded) == ["attention_mask", "input_ids", "labels"]
    assert padded["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 3, 3]]
    assert padded["labels"][1].tolist() == [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX]
    assert sft.tokens(padded) == 6  # the padding does not count

    packed = sft.collate(PACKED, pad_token_id=3)
    assert sorted(packed) == ["input_ids", "labels", "position_ids"]
    assert packed["input_ids"].shape == (2, 4) and packed["position_ids"][1].tolist() == [0, 1, 2, 0]
    assert sft.tokens(packed) == 8  # a packed batch has no mask: every position counts


def test_sft_loss_is_the_token_mean_cross_entropy_of_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    sft = get_objective("sft")
    batch = sft.collate(examples(3, 3), pad_token_id=0)
    with torch.no_grad():
        loss, (summed, scored) = sft.loss(model, batch), sft.score(model, batch)
        own = model(**batch).loss  # transformers' own loss of the same batch
    assert float(loss) == pytest.approx(token_mean_cross_entropy(model, batch), rel=1e-5)
    assert float(loss) == float(own)
    assert scored == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) and summed == float(loss) * scored

    # Held out: summed per batch, the sums of two batches give the token-weighted loss of all their tokens.
    other = sft.collate(examples(4, 2), pad_token_id=0)
    with torch.no_grad():
        sums = [sft.score(model, b) for b in (batch, other)]
    metrics = sft.held_out_metrics(tuple(map(sum, zip(*sums))))
    merged = sft.collate(examples(3, 3) + examples(4, 2), pad_token_id=0)
    assert metrics["loss"] == pytest.approx(token_mean_cross_entropy(model, merged), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


# ── the seam: another objective through the unchanged engine, evaluation and planner ─────────────────────────


def test_a_registered_objective_drives_the_engine_and_the_held_out_metrics(tiny_model_dir, tmp_path,
                                                                            one_worker_context, summed_objective):
    job = choosing(job_for(tiny_model_dir, tmp_path, "{kind: lora, lora: {dropout: 0.0}}"), "summed")
    engine = lora_engine(job, total_steps=2)  # objective_for reads training.objective
    assert isinstance(engine.objective, SummedNextToken)
    micro = [engine.objective.collate(examples(10 + m, 2), 0) for m in range(2)]
    with torch.no_grad():  # LoRA's B starts at zero: before the first step the model is the base model
        expected = [float(engine.objective.loss(engine.module, b)) for b in micro]
    assert engine.train_step(micro) == pytest.approx(sum(expected) / 2, rel=1e-5)

    eval_set = examples(20, 5)
    with torch.no_grad():
        per_example = [engine.objective.score(engine.module, engine.objective.collate([ex], 0)) for ex in eval_set]
    found = held_out_loss(engine, eval_set, pad_token_id=0, batch_size=2)
    summed = sum(s for s, _, _ in per_example)
    assert found == pytest.approx({"loss": summed / sum(n for _, n, _ in per_example),
                                   "loss_per_batch": summed / 3}, rel=1e-5)  # 5 examples in batches of 2


# ── data preparation asks the objective what a record becomes ──────────────────────────────────────────────────


def test_sft_prepares_exactly_what_render_and_pack_make(tokenizer, tmp_path):
    """Supervised fine-tuning's examples are the data modules' own: each record rendered and masked by `render`,
    in input order, cut at max_seq_len (dropped when the cut leaves no trained token); with data.packing, those
    examples through `Packer`, line for line."""
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    encoded = encode([render(to_conversation(r, "chat"), tokenizer) for r in RECORDS], tokenizer)

    def by_hand(max_len: int) -> list[dict]:
        cut = [(ids[:max_len], labels[:max_len]) for ids, labels in encoded]
        return [{"input_ids": ids, "labels": labels} for ids, labels in cut if set(labels) != {IGNORE_INDEX}]

    def prepared(folder: str, **data) -> tuple[str, object]:
        spec = DataSpec(train=str(path), eval_fraction=0, clean=CleanSpec(pii="off", near_dedup=False), **data)
        report = pipeline.prepare_files(spec, tokenizer, 0, tmp_path / folder)
        return (tmp_path / folder / "train.jsonl").read_text(), report

    text, report = prepared("plain", max_seq_len=48)
    assert text == "".join(json.dumps(ex, separators=(",", ":")) + "\n" for ex in by_hand(48))
    # Two records cut and kept, two whose prompt alone fills 48 tokens dropped: every branch of the length step.
    assert (report.truncated, report.too_long_dropped, report.train_records) == (2, 2, 3)

    text, report = prepared("packed", max_seq_len=128, packing=True)
    packer = Packer(128, writer := ExampleWriter(tmp_path / "by-hand.jsonl"))
    for ex in by_hand(128):
        packer.add(ex["input_ids"], ex["labels"])
    packer.close()
    writer.commit()
    assert text == writer.path.read_text()
    assert report.packed_rows == packer.rows < len(RECORDS)  # two examples share a row


def test_data_preparation_makes_the_examples_the_objective_says(tiny_model_dir, tokenizer, tmp_path,
                                                                  prompt_and_reply):
    """Through the job's data cache, as a run prepares: the objective renders (its `DataError` marks a record
    malformed), encodes under keys of its own, decides what is too long, and keeps data.packing from packing
    examples it cannot pack. Its name enters the cache key, so its examples never stand in for sft's."""
    unanswered = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                               {"role": "user", "content": "Are you there?"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [*RECORDS, unanswered])
    spec = JobSpec.model_validate({"name": "prep", "model": {"path": str(tiny_model_dir)}, "method": {"kind": "lora"},
                                   "data": {"train": str(path), "eval_fraction": 0, "max_seq_len": 40, "packing": True,
                                            "clean": {"pii": "off", "near_dedup": False, "max_bad_fraction": 0.5}}})
    sft_job = resolve(spec, run_id="prep-1")
    job = choosing(sft_job, "prompt_reply")
    assert content_hash(job) != content_hash(sft_job)

    report = prepare_to_folder(job, tmp_path / "data", tmp_path / "cache")
    lines = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    conversations = [to_conversation(r, "chat") for r in RECORDS]
    expected = PromptAndReply().encode([PromptAndReply().render(c, tokenizer) for c in conversations], tokenizer)
    kept = [ex for ex in expected if PromptAndReply().length(ex) <= 40]
    assert [json.loads(line) for line in lines] == kept and len(kept) == 4  # the warranty answer is too long
    assert report["too_long_dropped"] == 1 and report["truncated"] == 0  # dropped, though data.too_long: truncate
    assert report["malformed"] == 1 and "the last turn must be the assistant's" in report["malformed_examples"][0]
    assert report["packed_rows"] == 0 and report["token_lengths"]["max"] == max(map(PromptAndReply().length, kept))


def test_the_objective_travels_to_data_preparation_workers(tokenizer):
    """Worker processes receive the preparation's context pickled (they are spawned): the objective goes with it
    and renders and encodes there as here. Spawned workers themselves: test_data_pipeline's worker test (sft)."""
    ctx = pipeline._Context("chat", CleanSpec(pii="off"), tokenizer, [], PromptAndReply())
    rows = [(f"t.jsonl:{line}", record, None) for line, record in enumerate(RECORDS, 1)]
    here = pipeline._process_chunk(rows, ctx)
    there = pipeline._process_chunk(rows, pickle.loads(pickle.dumps(ctx)))
    assert [o.example for o in there] == [o.example for o in here]
    assert sorted(here[0].example) == ["prompt_ids", "reply_ids"]

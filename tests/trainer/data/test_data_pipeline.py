"""Preparation as a whole: the content-hash cache, the report files, custom PII patterns, MinHash near-dup,
sequence packing (attention stays inside each example), and worker processes preparing the same bytes."""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

import tunerun.trainer.data.pipeline as data_module
from tunerun.jobs.plan import resolve
from tunerun.jobs.spec import CleanSpec, DataSpec, JobSpec
from tunerun.trainer.data.clean import custom_rules, mask_custom
from tunerun.trainer.data.pack import collate
from tunerun.trainer.data.pipeline import prepare_data, prepare_files
from tunerun.trainer.data.cache import PREPARED_FILES, content_hash, prepare_to_folder, prepared_folder

REPO = Path(__file__).resolve().parents[3]
SUPPORT = REPO / "examples" / "data" / "support_tickets.jsonl"
STORY = ("the customer wrote that the package arrived two days late and the box was damaged on one side so the "
         "blender inside had a cracked lid and she would like a replacement lid sent to her home address")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def job_for(tiny_model_dir: Path, train: Path, **data) -> object:
    spec = JobSpec.model_validate({"name": "prep", "model": {"path": str(tiny_model_dir)}, "method": {"kind": "lora"},
                                   "data": {"train": str(train), **data}})
    return resolve(spec, run_id="prep-1")


# ---------------------------------------------------------------- cleaning additions


def test_custom_pii_patterns_mask_and_count(tokenizer, tmp_path):
    assert mask_custom("ask EMP-123456 or EMP-9", custom_rules({"EMPLOYEE_ID": r"EMP-\d{6}"}), counts := {}) == (
        "ask <EMPLOYEE_ID> or EMP-9")
    assert counts == {"employee_id": 1}
    path = write_jsonl(tmp_path / "t.jsonl", [chat("I am EMP-000042, mail me at a.b@example.com", "Hi EMP-000042")])
    clean = CleanSpec(pii_patterns={"EMPLOYEE_ID": r"EMP-\d{6}"})
    data = prepare_data(DataSpec(train=str(path), eval_fraction=0, clean=clean), tokenizer, seed=0)
    assert data.report.pii_masked["employee_id"] == 2 and data.report.pii_masked["email"] == 1
    assert "<EMPLOYEE_ID>" in tokenizer.decode(data.train[0]["input_ids"])


def test_a_text_repeated_across_records_is_masked_and_counted_in_each(tokenizer, tmp_path, monkeypatch):
    # A system prompt every record shares is cleaned once per process: the others must still carry its mask
    # and count its PII, also after the memory of cleaned texts has been emptied (here every 2 texts).
    system = {"role": "system", "content": "Escalate to  help@example.com."}
    words = STORY.split()
    rows = [{"messages": [system, *chat(" ".join(random.Random(i).sample(words, 12)), "shipping")["messages"]]}
            for i in range(5)]
    spec = DataSpec(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), eval_fraction=0)
    for remembered in (data_module.CLEANED_TEXTS, 2):
        monkeypatch.setattr(data_module, "CLEANED_TEXTS", remembered)
        data = prepare_data(spec, tokenizer, seed=0)
        assert data.report.pii_masked["email"] == 5 and data.report.train_records == 5
        for example in data.train:
            assert "Escalate to <EMAIL>." in tokenizer.decode(example["input_ids"])


def test_invalid_pii_pattern_is_refused_when_the_spec_loads():
    with pytest.raises(ValidationError, match=r"EMPLOYEE_ID: 'EMP-\(\\d' is not a valid regular expression"):
        CleanSpec(pii_patterns={"EMPLOYEE_ID": r"EMP-(\d"})
    with pytest.raises(ValidationError, match="matches the empty string"):
        CleanSpec(pii_patterns={"ANY": r"\d*"})


def test_minhash_removes_reworded_copies_at_the_threshold(tokenizer, tmp_path):
    long_story = f"{STORY} and she also asked whether the warranty covers the motor since it now makes a loud noise"
    one_word = long_story.replace("loud noise", "loud sound")  # word 3-gram Jaccard 0.90 (estimated 0.92)
    # word 3-gram Jaccard 0.74 (estimated 0.67):
    two_words = STORY.replace("two days", "three days").replace("home address", "office address")
    rows = [chat(long_story, "category: shipping"), chat(one_word, "category: shipping"),
            chat(STORY, "category: shipping"), chat(two_words, "category: shipping")]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    report = prepare_data(DataSpec(train=str(path), eval_fraction=0), tokenizer, seed=0).report
    assert (report.near_duplicates, report.fuzzy_duplicates, report.train_records) == (0, 1, 3)
    strict = DataSpec(train=str(path), eval_fraction=0, clean=CleanSpec(near_dedup_threshold=0.6))
    assert prepare_data(strict, tokenizer, seed=0).report.fuzzy_duplicates == 2
    off = DataSpec(train=str(path), eval_fraction=0, clean=CleanSpec(near_dedup_threshold=1.0))
    assert prepare_data(off, tokenizer, seed=0).report.fuzzy_duplicates == 0


def test_minhash_signatures_and_band_layout_are_datasketchs():
    """The numpy MinHash gives datasketch's values for the same shingles and shingle hash, and the stored band
    layout is the one datasketch's optimiser picks for the default threshold."""
    from datasketch import MinHash, MinHashLSH

    from tunerun.trainer.data import clean

    rng = random.Random(3)
    texts = [" ".join(rng.choice(STORY.split() + ["é", "日本"]) for _ in range(rng.randint(0, 30)))
             for _ in range(50)] + ["", "one", "two words", "", "three words here"]
    # words past the vectorised CRC's 32 bytes (zlib takes those), at its edge, and other ASCII blanks
    texts += [f"see https://example.com/{'x' * 60} now {'a' * 32} {'b' * 33} ok", "tab\tand\nnew line é" * 3]
    template = MinHash(num_perm=clean.MINHASH_PERMUTATIONS, seed=clean.MINHASH_SEED,
                       hashfunc=clean.shingle_hash)
    for text, signature in zip(texts, clean.minhash_signatures(texts)):
        words = text.split()
        sketch = template.copy()
        sketch.update_batch({" ".join(words[i:i + 3]).encode() for i in range(max(1, len(words) - 2))})
        assert signature.tolist() == sketch.hashvalues.tolist(), text
    default = CleanSpec().near_dedup_threshold
    lsh = MinHashLSH(threshold=default - 0.15, num_perm=clean.MINHASH_PERMUTATIONS)
    assert clean.band_layout(default) == tuple((i * lsh.r, (i + 1) * lsh.r) for i in range(lsh.b))


def test_contamination_counts_fuzzy_copies_of_training_examples(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(STORY, "category: shipping"), chat("reset password", "login")])
    evals = write_jsonl(tmp_path / "eval.jsonl", [chat(STORY.replace("two", "four"), "category: shipping"),
                                                  chat("where is my refund", "refund")])
    report = prepare_data(DataSpec(train=str(train), eval=str(evals)), tokenizer, seed=0).report
    assert (report.eval_records, report.contaminated_eval) == (2, 1)


def test_normalisation_can_be_switched_off(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("spaced   out", "ｆｕｌｌ width")])
    on = prepare_data(DataSpec(train=str(path), eval_fraction=0), tokenizer, seed=0)
    off = prepare_data(DataSpec(train=str(path), eval_fraction=0, clean=CleanSpec(normalize=False)), tokenizer, seed=0)
    assert "spaced out" in tokenizer.decode(on.train[0]["input_ids"])
    assert "spaced   out" in tokenizer.decode(off.train[0]["input_ids"])


# ---------------------------------------------------------------- packing


def test_packing_fills_rows_and_restarts_positions(tokenizer):
    plain = prepare_data(DataSpec(train=str(SUPPORT), max_seq_len=256), tokenizer, seed=0)
    packed = prepare_data(DataSpec(train=str(SUPPORT), max_seq_len=256, packing=True), tokenizer, seed=0)
    rows, report = packed.train, packed.report
    assert report.train_records == len(plain.train) and report.packed_rows == len(rows) < len(plain.train) / 2
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= 256 for r in rows)
    assert report.packing_efficiency > 0.85
    assert sum(r["position_ids"].count(0) for r in rows) == len(plain.train)  # every example, once
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for e in plain.train for t in e["input_ids"])
    assert packed.eval == plain.eval  # evaluation stays one example per row


def test_collate_of_packed_rows_gives_position_ids_and_no_mask():
    batch = collate([{"input_ids": [1, 5, 1, 7], "labels": [-100, 5, -100, 7], "position_ids": [0, 1, 0, 1]},
                     {"input_ids": [1, 9], "labels": [-100, 9], "position_ids": [0, 1]}], pad_token_id=3)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]  # padding is a sequence of its own
    assert batch["labels"].tolist() == [[-100, 5, -100, 7], [-100, 9, -100, -100]]


def test_packed_row_logits_equal_each_example_run_alone(tiny_model_dir, tokenizer, tmp_path):
    """transformers builds a block-causal mask from position ids when there is no attention mask and no KV
    cache (masking_utils.find_packed_sequence_indices), so packing must not change what a model computes."""
    path = write_jsonl(tmp_path / "t.jsonl", [chat("my order never arrived", "category: shipping"),
                                              chat("I was charged twice this month", "category: billing")])
    plain = prepare_data(DataSpec(train=str(path), eval_fraction=0), tokenizer, seed=0).train
    packed = prepare_data(DataSpec(train=str(path), eval_fraction=0, packing=True), tokenizer, seed=0).train
    assert len(packed) == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    batch = collate(packed, tokenizer.pad_token_id)
    first = len(plain[0]["input_ids"])
    with torch.no_grad():
        row = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        alone = model(**{k: v for k, v in collate([plain[1]], tokenizer.pad_token_id).items() if k != "labels"},
                      use_cache=False).logits[0]
        leaked = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # no position ids: one sequence
    torch.testing.assert_close(row[first:], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(leaked[first:], alone, atol=1e-2)  # the comparison can fail
    # The loss over the packed row is the sum of the examples' losses: no token is scored across examples.
    losses = [model(**collate([ex], tokenizer.pad_token_id), use_cache=False).loss for ex in plain]
    scored = [sum(label != -100 for label in ex["labels"][1:]) for ex in plain]
    packed_loss = model(**batch, use_cache=False).loss
    torch.testing.assert_close(packed_loss, sum(l * n for l, n in zip(losses, scored)) / sum(scored),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- cache and report files


def test_prepare_to_folder_writes_files_and_reuses_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"question {i} from jane@example.com", f"answer {i}")
                                                   for i in range(30)])
    job = job_for(tiny_model_dir, train)
    report = prepare_to_folder(job, tmp_path / "run1" / "data", tmp_path / "cache")
    assert (report["records_read"], report["train_records"] + report["eval_records"]) == (30, 30)
    assert sorted(p.name for p in (tmp_path / "run1" / "data").iterdir()) == sorted(PREPARED_FILES)
    cached = tmp_path / "cache" / content_hash(job)
    assert (cached / "COMPLETE").is_file()
    html = (cached / "data_report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html and "email" in html
    assert (cached / "data_report.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("data_report.html", "data_report.json"):  # counts only, never the values
        assert "jane@example.com" not in (cached / name).read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("prepared again although nothing changed")

    monkeypatch.setattr(data_module, "prepare_files", must_not_run)
    assert prepare_to_folder(job, tmp_path / "run2" / "data", tmp_path / "cache") == report
    assert prepared_folder(job, tmp_path / "cache") == (cached, True)
    assert (tmp_path / "run2" / "data" / "train.jsonl").read_bytes() == (cached / "train.jsonl").read_bytes()


def test_cache_key_follows_data_spec_seed_and_file_bytes(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat("q", "a")])
    key = content_hash(job_for(tiny_model_dir, train))
    assert content_hash(job_for(tiny_model_dir, train)) == key
    assert content_hash(job_for(tiny_model_dir, train, max_seq_len=512)) != key
    moved = shutil.copytree(tiny_model_dir, tmp_path / "same-model-elsewhere")
    assert content_hash(job_for(moved, train)) == key  # tokenizer files count by name and bytes
    (moved / "tokenizer_config.json").write_text((moved / "tokenizer_config.json").read_text().replace("}", ' }'))
    assert content_hash(job_for(moved, train)) != key
    write_jsonl(train, [chat("q", "b")])
    assert content_hash(job_for(tiny_model_dir, train)) != key


def copies_of_every_kind(n: int) -> list[dict]:
    """``n`` chat records among which exact copies, copies up to case and punctuation, reworded copies (MinHash),
    PII and replies too long for 160 tokens, each kind far from the record it copies (other chunks, other workers)."""
    rng = random.Random(7)
    words = STORY.split()
    rows = []
    for i in range(n):
        if i % 11 == 5 and i > 40:
            rows.append(rows[i - 40])  # exact copy
        elif i % 13 == 6 and i > 40:
            source = rows[i - 37]["messages"]
            rows.append(chat(source[0]["content"].upper() + "!", source[1]["content"]))  # near copy
        elif i % 7 == 3 and i > 40:
            source = rows[i - 29]["messages"]
            rows.append(chat(source[0]["content"].replace(" box ", " carton "), source[1]["content"]))  # reworded
        else:
            story = " ".join(rng.sample(words, 20))
            contact = f" mail {rng.choice(['ana', 'bo'])}{i}@example.com" if i % 5 == 0 else ""
            reply = "category: shipping" + (" and more" * 80 if i % 17 == 0 else "")
            rows.append(chat(f"ticket {i}: {story}{contact}", reply))
    return rows


@pytest.mark.slow
def test_worker_processes_prepare_the_same_bytes(tokenizer, tmp_path, monkeypatch):
    """One process or three workers (more than this machine's cores): the same train.jsonl and eval.jsonl, byte for
    byte, and the same report, MinHash decisions included (copies within the training set, and evaluation records
    that copy training ones). Chunks of 16 records spread every kind of copy over different chunks and workers;
    only this process decides, in input order, which record is a copy. While the workers start, chunks are prepared
    here: the workers start after the third, and this process waits for them, so they get every later chunk."""
    runners, prepared_here, three_here = [], [], threading.Event()
    start_runner, start_workers = data_module._ChunkRunner.__init__, data_module._ChunkRunner._start_workers
    prepare_chunk = data_module._prepare_chunk

    def runner(self, *args):
        start_runner(self, *args)
        runners.append(self)

    def start_after_three(self, workers):  # a fork server left running by an earlier test starts workers at once
        three_here.wait(timeout=120)
        start_workers(self, workers)

    def prepare_here(rows, ctx):  # in this process only: the workers import the module afresh
        prepared_here.append(len(rows))
        if len(prepared_here) == 3 and runners[-1].pool is not None:
            three_here.set()
            runners[-1].started.result(timeout=120)
        return prepare_chunk(rows, ctx)

    monkeypatch.setattr(data_module._ChunkRunner, "__init__", runner)
    monkeypatch.setattr(data_module._ChunkRunner, "_start_workers", start_after_three)
    monkeypatch.setattr(data_module, "_prepare_chunk", prepare_here)
    rows = copies_of_every_kind(440)
    train, evals = write_jsonl(tmp_path / "train.jsonl", rows[:400]), write_jsonl(tmp_path / "eval.jsonl", [
        chat(r["messages"][0]["content"].replace(" the ", " a ", 1), r["messages"][1]["content"]) for r in rows[:20]
    ] + rows[400:])
    spec = DataSpec(train=str(train), eval=str(evals), max_seq_len=160, too_long="truncate")
    monkeypatch.setattr(data_module, "CHUNK_RECORDS", 16)
    outputs = {}
    for workers in (1, 3):
        monkeypatch.setenv("TUNERUN_DATA_WORKERS", str(workers))
        prepared_here.clear()
        report = prepare_files(spec, tokenizer, seed=0, out_dir=tmp_path / f"w{workers}")
        assert sum(prepared_here) == 460 if workers == 1 else prepared_here == [16] * 3  # 400 + 60 records
        outputs[workers] = (dataclasses.asdict(report), *((tmp_path / f"w{workers}" / name).read_bytes()
                                                          for name in ("train.jsonl", "eval.jsonl")))
    report = outputs[1][0]
    assert report["duplicates"] > 0 and report["near_duplicates"] > 0 and report["fuzzy_duplicates"] > 0
    assert report["contaminated_eval"] > 0 and report["truncated"] > 0 and report["pii_masked"]["email"] > 0
    assert outputs[3] == outputs[1]

"""tunerun.trainer.data: records in the formats users bring → tokenized examples with the right loss mask."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunerun.jobs.errors import DataError
from tunerun.jobs.spec import CleanSpec, DataSpec
from tunerun.trainer.data.clean import mask_pii, normalize_text
from tunerun.trainer.data.pack import collate
from tunerun.trainer.data.pipeline import prepare_data
from tunerun.trainer.data.formats import detect_format, to_conversation, to_messages
from tunerun.jobs.data_files import resolve_files
from tunerun.trainer.data.read import read_records

REPO = Path(__file__).resolve().parents[3]
SUPPORT = REPO / "examples" / "data" / "support_tickets.jsonl"
FORMATS_DIR = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "formats"
needs_shared = pytest.mark.skipif(not FORMATS_DIR.is_dir(), reason=f"shared dataset files not found at {FORMATS_DIR}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are, e.g. broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, reply: str, system: str | None = None) -> dict:
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": [*head, {"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def spec(train, **kw) -> DataSpec:
    clean = kw.pop("clean", {})
    return DataSpec(train=str(train), clean=CleanSpec(**clean), **kw)


def trained_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])


# ---------------------------------------------------------------- formats


def test_tiny_model_folder_loads_like_a_real_model(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    assert (tiny_model_dir / "tokenizer.model").is_file()  # llama.cpp's GGUF converter reads it
    assert tokenizer.chat_template is None
    ids = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (0, 1, 2, 3)
    text = "Hello, I was charged twice! jane@example.com\n  ünïcode 😀"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (model.config.vocab_size, model.config.num_hidden_layers) == (len(tokenizer), 2)


def test_support_tickets_report_counts_the_planted_duplicates_and_pii(tokenizer, example_module):
    gen = example_module("make_support_data")
    data = prepare_data(spec(SUPPORT), tokenizer, seed=42)
    r = data.report
    assert (r.format, r.records_read, r.malformed) == ("chat", 600, 0)
    assert (r.duplicates, r.near_duplicates) == (gen.EXACT_DUPLICATES, gen.NEAR_DUPLICATES)
    # MinHash finds 3 more: tickets generated twice with only the greeting different ("Hi," / "Hello,"). The generator
    # made a few more such pairs; which ones the 64-value estimate catches near the threshold depends on the hash.
    assert r.fuzzy_duplicates == 3
    assert r.pii_masked["email"] > 0 and r.pii_masked["phone"] > 0
    assert r.pii_masked["ip_address"] == 1 and r.pii_masked["iban"] == 1
    kept = 600 - gen.EXACT_DUPLICATES - gen.NEAR_DUPLICATES - r.fuzzy_duplicates
    assert (r.train_records, r.eval_records) == (kept - round(kept * 0.05), round(kept * 0.05))
    assert len(data.train) == r.train_records and r.contaminated_eval == 0
    json.dumps(dataclasses.asdict(r))  # the report is written as JSON


def test_support_data_generator_is_deterministic(tmp_path, example_module):
    out = example_module("make_support_data").make_support_data(tmp_path / "tickets.jsonl")
    assert out.read_bytes() == SUPPORT.read_bytes()


def test_chat_labels_are_the_assistant_reply_and_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("My invoice is wrong", "category: billing", "Classify.")])
    ex = prepare_data(spec(path, eval_fraction=0), tokenizer, seed=0).train[0]
    assert ex["input_ids"][0] == tokenizer.bos_token_id and len(ex["labels"]) == len(ex["input_ids"])
    assert trained_text(tokenizer, ex) == "category: billing" + tokenizer.eos_token
    assert "invoice" not in trained_text(tokenizer, ex)
    assert "My invoice is wrong" in tokenizer.decode(ex["input_ids"])


def test_assistant_turn_with_weight_zero_is_not_trained(tokenizer, tmp_path):
    record = {"messages": [
        {"role": "user", "content": "first question"}, {"role": "assistant", "content": "old answer", "weight": 0},
        {"role": "user", "content": "second question"}, {"role": "assistant", "content": "new answer"},
    ]}
    ex = prepare_data(spec(write_jsonl(tmp_path / "t.jsonl", [record]), eval_fraction=0), tokenizer, 0).train[0]
    assert trained_text(tokenizer, ex) == "new answer" + tokenizer.eos_token
    assert "old answer" in tokenizer.decode(ex["input_ids"])


def test_chat_template_of_the_tokenizer_is_used_with_exact_masks(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHATML
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                           {"role": "user", "content": "bye"}, {"role": "assistant", "content": "goodbye"}]}
    ex = prepare_data(spec(write_jsonl(tmp_path / "t.jsonl", [record]), eval_fraction=0), tok, 0).train[0]
    assert "<|im_start|>user\nhi<|im_end|>" in tok.decode(ex["input_ids"])
    assert trained_text(tok, ex) == "hello there<|im_end|>\ngoodbye<|im_end|>\n"


@needs_shared
def test_alpaca_demo_file_loads(tokenizer):
    data = prepare_data(spec(FORMATS_DIR / "alpaca_en_demo.json"), tokenizer, seed=0)
    r = data.report
    assert (r.format, r.records_read, r.malformed) == ("alpaca", 999, 0)
    assert r.train_records > 900 and r.eval_records > 0
    untruncated = [ex for ex in data.train if len(ex["input_ids"]) < 1024]
    assert all(trained_text(tokenizer, ex).endswith(tokenizer.eos_token) for ex in untruncated)


@needs_shared
def test_identity_file_loads_as_alpaca(tokenizer):
    data = prepare_data(spec(FORMATS_DIR / "identity.json", eval_fraction=0), tokenizer, seed=0)
    assert data.report.fuzzy_duplicates == 0  # same answers, different questions: not copies
    assert (data.report.format, data.report.records_read, data.report.train_records) == ("alpaca", 91, 91)
    assert trained_text(tokenizer, data.train[0]).startswith("Hello! I am {{name}}")


@needs_shared
def test_glaive_toolcall_file_loads_as_sharegpt_with_tools(tokenizer):
    data = prepare_data(spec(FORMATS_DIR / "glaive_toolcall_en_demo.json"), tokenizer, seed=0)
    assert (data.report.format, data.report.records_read, data.report.malformed) == ("sharegpt", 300, 0)
    assert data.report.train_records > 200 and data.report.duplicates == 34  # the demo file repeats records
    first = next(r for _, r, _ in read_records([FORMATS_DIR / "glaive_toolcall_en_demo.json"]))
    conversation = to_conversation(first, "sharegpt")
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant", "tool",
                                                           "assistant", "user", "assistant"]
    assert conversation.tools[0]["type"] == "function" and conversation.tools[0]["function"]["name"] == "search_recipes"
    call = conversation.messages[3]["tool_calls"][0]["function"]  # function_call is an assistant tool call
    assert call == {"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}
    text = tokenizer.decode(data.train[0]["input_ids"])
    assert "<|system|>\nAvailable tools:\n[{" in text and "<|tool|>\n" in text


@needs_shared
def test_c4_text_file_trains_on_every_token(tokenizer):
    data = prepare_data(spec(FORMATS_DIR / "c4_demo.jsonl", max_seq_len=256), tokenizer, seed=0)
    assert (data.report.format, data.report.records_read) == ("text", 300)
    for ex in data.train[:20]:
        assert ex["labels"][0] == -100 and ex["labels"][1:] == ex["input_ids"][1:]  # all but BOS
        assert len(ex["input_ids"]) <= 256


@pytest.mark.parametrize("record, fmt", [
    (chat("q", "a"), "chat"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
    ({"text": "plain text"}, "text"),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_unknown_format_lists_keys_found_and_formats_expected():
    with pytest.raises(DataError, match=r"found keys \['prompt', 'response'\].*alpaca"):
        detect_format({"prompt": "q", "response": "a"})


def test_alpaca_with_system_input_and_history():
    record = {"system": "Be brief.", "history": [["hi", "hello"]],
              "instruction": "Sum", "input": "1 2", "output": "3"}
    assert to_messages(record, "alpaca") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Sum\n\n1 2"},
        {"role": "assistant", "content": "3"},
    ]


def test_declared_format_is_enforced(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("q", "a")] * 3)
    with pytest.raises(DataError, match=r"expected alpaca format but found keys \['messages'\]"):
        prepare_data(spec(path, format="alpaca"), tokenizer, seed=0)


def test_json_file_with_one_object_per_line_and_array_line_numbers(tmp_path):
    lines = tmp_path / "lines.json"
    write_jsonl(lines, [{"text": "a"}, {"text": "b"}])
    array = tmp_path / "array.json"
    array.write_text('[\n  {"text": "a"},\n  7,\n  {"text":\n "c"}\n]\n')
    assert [(w, r) for w, r, _ in read_records([lines])] == [(f"{lines}:1", {"text": "a"}),
                                                              (f"{lines}:2", {"text": "b"})]
    assert [(w, e) for w, _, e in read_records([array])] == [
        (f"{array}:2", None), (f"{array}:3", "expected a JSON object, got int"), (f"{array}:4", None)]


# ---------------------------------------------------------------- bad input


def test_malformed_jsonl_line_is_named_in_the_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat("q1", "a1"), chat("q2", "a2"), "{not json", chat("q4", "a4")])
    with pytest.raises(DataError) as err:
        prepare_data(spec(path), tokenizer, seed=0)
    message = str(err.value)
    assert f"{path}:3: not valid JSON" in message
    assert "25.0%" in message and "data.clean.max_bad_fraction = 1.0%" in message


def test_max_bad_fraction_is_respected_both_ways(tokenizer, tmp_path):
    rows = [chat(f"question {i}", f"answer {i}") for i in range(10)]
    rows[2] = "{broken"
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match="1 of 10 records"):
        prepare_data(spec(path, clean={"max_bad_fraction": 0.05}), tokenizer, seed=0)
    report = prepare_data(spec(path, clean={"max_bad_fraction": 0.1}), tokenizer, seed=0).report
    assert report.malformed == 1
    assert report.malformed_examples == [f"{path}:3: not valid JSON (Expecting property name "
                                         "enclosed in double quotes at column 2)"]
    assert report.train_records + report.eval_records == 9


def test_missing_file_and_unmatched_glob(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl.*current directory"):
        resolve_files(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"no data files match .*\*\.jsonl.*current directory"):
        resolve_files(str(tmp_path / "*.jsonl"))


def test_glob_matches_files_in_order(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text("")
    assert resolve_files(str(tmp_path / "*.jsonl")) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]


def test_empty_file_has_no_training_records(tokenizer, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=rf"no training records left in {path} \(read 0\); the files hold no records"):
        prepare_data(spec(path), tokenizer, seed=0)


def test_records_without_trainable_text_count_as_empty(tokenizer, tmp_path):
    weight_zero = chat("q", "not trained")
    weight_zero["messages"][-1]["weight"] = 0
    path = write_jsonl(tmp_path / "t.jsonl", [chat("q", "   "), chat("q", "a"), weight_zero])
    report = prepare_data(spec(path, eval_fraction=0), tokenizer, seed=0).report
    assert (report.empty, report.train_records) == (2, 1)


# ---------------------------------------------------------------- cleaning


def test_dedup_switches(tokenizer, example_module):
    gen = example_module("make_support_data")
    both_off = prepare_data(spec(SUPPORT, clean={"dedup": False, "near_dedup": False}), tokenizer, seed=0).report
    assert (both_off.duplicates, both_off.near_duplicates) == (0, 0)
    assert both_off.train_records + both_off.eval_records == 600
    near_only = prepare_data(spec(SUPPORT, clean={"dedup": False}), tokenizer, seed=0).report
    assert (near_only.duplicates, near_only.near_duplicates) == (0, gen.EXACT_DUPLICATES + gen.NEAR_DUPLICATES)


def test_normalisation_nfkc_and_whitespace():
    assert normalize_text("  ｒｅｆｕｎｄ   please\t\tnow  \n    def f():\n\treturn  1\r\n") == (
        "refund please now\n    def f():\n\treturn 1")


@pytest.mark.parametrize("text, masked, kind", [
    ("mail jane.doe@example.com today", "mail <EMAIL> today", "email"),
    ("call 555-123-4567 now", "call <PHONE> now", "phone"),
    ("call +44 20 7946 0958 now", "call <PHONE> now", "phone"),
    ("host 192.168.14.37 is down", "host <IP_ADDRESS> is down", "ip_address"),
    ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN <IBAN> please", "iban"),
    ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok", "credit_card"),
    ("card 5500-0000-0000-0004 ok", "card <CREDIT_CARD> ok", "credit_card"),
])
def test_pii_is_masked_by_type(text, masked, kind):
    counts: dict[str, int] = {}
    assert mask_pii(text, counts) == masked
    assert counts == {kind: 1}


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 fails Luhn",
    "order #12345 on 2024-01-15 at 10:30 cost $1,000.50",
    "years 1999 2000 2001, version 1.2.3",
])
def test_pii_leaves_lookalikes_alone(text):
    counts: dict[str, int] = {}
    assert mask_pii(text, counts) == text and counts == {}


def test_pii_masking_applies_to_all_messages_and_can_be_off(tokenizer, tmp_path):
    record = chat("I am bob@example.com, card 4111 1111 1111 1112", "Noted, bob@example.com", "Call 555-123-4567")
    path = write_jsonl(tmp_path / "t.jsonl", [record])
    data = prepare_data(spec(path, eval_fraction=0), tokenizer, seed=0)
    text = tokenizer.decode(data.train[0]["input_ids"])
    assert "bob@" not in text and text.count("<EMAIL>") == 2 and "<PHONE>" in text and "4111 1111 1111 1112" in text
    assert data.report.pii_masked == {"email": 2, "phone": 1, "ip_address": 0, "iban": 0, "iban_checksum_failed": 0,
                                      "credit_card": 0, "person": 0, "street_address": 0}
    assert "bob@" not in json.dumps(dataclasses.asdict(data.report))  # counts only, never the values
    off = prepare_data(spec(path, eval_fraction=0, clean={"pii": "off"}), tokenizer, seed=0)
    assert "bob@example.com" in tokenizer.decode(off.train[0]["input_ids"]) and off.report.pii_masked == {}


# ---------------------------------------------------------------- length, split, collate


def test_truncation_keeps_trainable_examples_and_drops_the_rest(tokenizer, tmp_path):
    texts = write_jsonl(tmp_path / "text.jsonl", [{"text": "word " * 50}, {"text": "short"}])
    data = prepare_data(spec(texts, max_seq_len=32, eval_fraction=0), tokenizer, seed=0)
    assert (data.report.truncated, data.report.too_long_dropped) == (1, 0)
    assert len(data.train[0]["input_ids"]) == 32 and len(data.train[1]["input_ids"]) < 32
    assert data.train[0]["labels"][1:] == data.train[0]["input_ids"][1:]
    # The default template alone takes ~20 tokens: a long question leaves no room for the answer.
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat("long " * 40, "a"), chat("q", "a")])
    data = prepare_data(spec(chats, max_seq_len=32, eval_fraction=0), tokenizer, seed=0)
    assert (data.report.truncated, data.report.too_long_dropped, data.report.train_records) == (0, 1, 1)


def test_too_long_drop_removes_instead_of_truncating(tokenizer, tmp_path):
    texts = write_jsonl(tmp_path / "text.jsonl", [{"text": "word " * 50}, {"text": "short"}])
    data = prepare_data(spec(texts, max_seq_len=32, eval_fraction=0, too_long="drop"), tokenizer, seed=0)
    assert (data.report.truncated, data.report.too_long_dropped, data.report.train_records) == (0, 1, 1)
    assert data.report.token_lengths["max"] < 32


def test_split_is_deterministic_by_seed(tokenizer):
    def held_out(seed, fraction=0.05):
        return [ex["input_ids"] for ex in prepare_data(spec(SUPPORT, eval_fraction=fraction), tokenizer, seed).eval]

    assert held_out(1) == held_out(1)
    assert held_out(1) != held_out(2)
    assert held_out(1, fraction=0) == []


def test_empty_eval_file_is_refused(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat("q", "a")])
    evals = write_jsonl(tmp_path / "eval.jsonl", [])
    with pytest.raises(DataError, match=f"no evaluation records in {evals}"):
        prepare_data(DataSpec(train=str(train), eval=str(evals)), tokenizer, seed=0)


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(DataError, match=f"{path}:3: not valid JSON"):
        list(read_records([path]))


def test_eval_file_is_used_and_contamination_reported(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(5)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [chat("Q1!", "a1"), chat("new", "b")])
    data = prepare_data(DataSpec(train=str(train), eval=str(evals)), tokenizer, seed=0)
    r = data.report
    assert (r.train_records, r.eval_records, r.contaminated_eval) == (5, 2, 1)
    assert r.files == [str(train), str(evals)]


def test_collate_pads_right_with_minus_100_labels():
    import torch

    batch = collate([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}],
                    pad_token_id=3)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 3]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())

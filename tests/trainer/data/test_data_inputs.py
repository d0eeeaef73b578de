"""Inputs as users export them: Parquet, CSV, other column names, OpenAI tools — and the broken ones, each
refused with one message that says where (file, line), what was expected and what to do."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tunerun.jobs.errors import DataError
from tunerun.jobs.spec import CleanSpec, DataSpec
from tunerun.trainer.data.pipeline import prepare_data
from tunerun.jobs.data_files import resolve_files

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function",
          "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}}]
TOOL_CHAT = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18°C, sunny"},
    {"role": "assistant", "content": "It is 18°C and sunny in Paris."},
]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def spec(train, **kw) -> DataSpec:
    return DataSpec(train=str(train), clean=CleanSpec(**kw.pop("clean", {})), **kw)


def trained_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])


def refused(tokenizer, data_spec: DataSpec) -> str:
    with pytest.raises(DataError) as err:
        prepare_data(data_spec, tokenizer, seed=0)
    return str(err.value)


# ---------------------------------------------------------------- formats and columns


def test_parquet_chat_with_nested_messages(tokenizer, tmp_path):
    rows = [chat(f"question {i}", f"answer {i}") for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    data = prepare_data(spec(tmp_path / "chat.parquet", eval_fraction=0), tokenizer, seed=0)
    assert (data.report.format, data.report.records_read, data.report.train_records) == ("chat", 20, 20)
    assert trained_text(tokenizer, data.train[3]) == "answer 3" + tokenizer.eos_token


def test_parquet_with_column_mapping_names_rows(tokenizer, tmp_path):
    table = pa.table({"question": [f"q{i}" for i in range(5)], "answer": [f"a{i}" for i in range(5)]})
    pq.write_table(table, tmp_path / "qa.parquet")
    columns = {"instruction": "question", "output": "answer"}
    data = prepare_data(spec(tmp_path / "qa.parquet", columns=columns, eval_fraction=0), tokenizer, seed=0)
    assert data.report.format == "alpaca" and trained_text(tokenizer, data.train[4]) == "a4" + tokenizer.eos_token
    message = refused(tokenizer, spec(tmp_path / "qa.parquet", columns={"instruction": "prompt", "output": "answer"}))
    assert message.startswith(f"{tmp_path / 'qa.parquet'}:row 1: data.columns maps instruction → 'prompt'")
    assert "its columns: question, answer" in message and "fix data.columns to name one" in message


def test_csv_with_column_mapping_and_a_json_messages_column(tokenizer, tmp_path):
    qa = tmp_path / "qa.csv"
    qa.write_text('question,answer,notes\n"What is 2+2?",4,\n"Multi\nline question",yes,x\n', encoding="utf-8")
    data = prepare_data(spec(qa, columns={"instruction": "question", "output": "answer"}, eval_fraction=0),
                        tokenizer, seed=0)
    assert data.report.records_read == 2
    assert "Multi\nline question" in tokenizer.decode(data.train[1]["input_ids"])
    dialogs = tmp_path / "dialogs.csv"
    cells = [json.dumps(chat(f"hi {i}", f"hello {i}")["messages"]).replace('"', '""') for i in range(3)]
    dialogs.write_text("dialog\n" + "".join(f'"{cell}"\n' for cell in cells), encoding="utf-8")
    data = prepare_data(spec(dialogs, columns={"messages": "dialog"}, eval_fraction=0), tokenizer, seed=0)
    assert data.report.format == "chat" and trained_text(tokenizer, data.train[2]) == "hello 2" + tokenizer.eos_token


def test_csv_line_numbers_count_multiline_cells(tokenizer, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('instruction,output\n"two\nlines",ok\nq,a,extra\nq2,\n', encoding="utf-8")
    report = prepare_data(spec(path, clean={"max_bad_fraction": 1}, eval_fraction=0), tokenizer, seed=0).report
    assert report.malformed_examples == [f"{path}:4: more cells than the header has columns (2)"]
    assert (report.records_read, report.empty, report.train_records) == (3, 1, 1)  # an empty cell: nothing to learn


def test_openai_tools_without_chat_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_CHAT])
    ex = prepare_data(spec(path, eval_fraction=0), tokenizer, seed=0).train[0]
    text = tokenizer.decode(ex["input_ids"])
    assert '<|system|>\nAvailable tools:\n[{"type": "function", "function": {"name": "get_weather"' in text
    assert "<|tool|>\n18°C, sunny\n" in text
    # Both assistant turns train: the call as one JSON line, then the answer; the tool result does not.
    assert trained_text(tokenizer, ex) == ('{"name": "get_weather", "arguments": {"city": "Paris"}}</s>'
                                           "It is 18°C and sunny in Paris.</s>")


def test_openai_tools_are_passed_to_the_chat_template(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (
        "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}({{ c.function.arguments.city }})</call>"
        "{% endfor %}"
        "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_CHAT])
    ex = prepare_data(spec(path, eval_fraction=0), tok, seed=0).train[0]
    assert tok.decode(ex["input_ids"]).startswith("<s> <tools>get_weather;</tools>")
    assert trained_text(tok, ex) == "<call>get_weather(Paris)</call><|end|>\nIt is 18°C and sunny in Paris.<|end|>\n"


def test_a_folder_names_the_data_files_in_it(tmp_path):
    for name in ("b.jsonl", "a.parquet", "notes.txt"):
        (tmp_path / name).write_text("")
    assert resolve_files(str(tmp_path)) == [tmp_path / "a.parquet", tmp_path / "b.jsonl"]


# ---------------------------------------------------------------- bad input, one message each


def test_unknown_format_names_the_fields_it_saw(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    message = refused(tokenizer, spec(path))
    assert message.startswith(f"{path}:1: unknown record format: found keys ['completion', 'prompt']")
    assert "data.columns" in message and "alpaca" in message


def test_mixed_formats_in_one_file(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("q1", "a1"), chat("q2", "a2"), {"instruction": "q", "output": "a"}])
    assert refused(tokenizer, spec(path)) == (
        f"{path}:3: this record is alpaca but the file's first record ({path}:1) is chat; one file must hold one "
        "format: split it into one file per format (data.train may be a glob)")


def test_files_of_different_formats_in_one_glob_are_fine(tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [chat("q1", "a1")])
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "q2", "output": "a2"}])
    report = prepare_data(spec(tmp_path / "*.jsonl", eval_fraction=0), tokenizer, seed=0).report
    assert (report.format, report.train_records) == ("chat, alpaca", 2)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_bytes_are_refused_with_line_and_column(tokenizer, tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    lines = {".jsonl": ['{"text": "fine"}', '{"text": "café"}'], ".json": ["[", '{"text": "café"}]'],
             ".csv": ["text", "café"]}[suffix]
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    message = refused(tokenizer, spec(path))
    column = lines[1].index("é") + 1
    assert message.startswith(f"{path}:2: not UTF-8 text (byte 0xe9 at column {column}); save the file as UTF-8")
    assert "iconv -f latin1 -t utf-8" in message


def test_last_line_cut_off_mid_record(tokenizer, tmp_path):
    path = tmp_path / "export.jsonl"
    path.write_text(json.dumps(chat("q1", "a1")) + "\n" + json.dumps(chat("q2", "a2"))[:-17], encoding="utf-8")
    assert refused(tokenizer, spec(path)) == (
        f"{path}:2: the file ends in the middle of a record (an interrupted export or copy?); export the file "
        "again, or delete the incomplete last record")
    array = tmp_path / "export.json"
    array.write_text("[\n" + json.dumps(chat("q1", "a1")) + ",\n" + json.dumps(chat("q2", "a2"))[:-5])
    assert f"{array}:3: the file ends in the middle of a record" in refused(tokenizer, spec(array))


def test_conversation_without_assistant_turn(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "system", "content": "s"},
                                                            {"role": "user", "content": "hello?"}]}])
    message = refused(tokenizer, spec(path))
    assert (f"{path}:1: conversation has no assistant turn (roles: system, user); each record needs at least "
            "one assistant reply to train on") in message
    assert "Fix these records, or raise data.clean.max_bad_fraction" in message


@pytest.mark.parametrize("roles, problem", [
    (["assistant", "user", "assistant"], "messages[0]: roles out of order: assistant at the start, expected user"),
    (["user", "user", "assistant"],
     "messages[1]: roles out of order: user right after a user turn, expected assistant"),
    (["user", "assistant", "system", "user", "assistant"], "messages[2]: a system message is only allowed first"),
    (["user", "tool", "assistant"], "messages[1]: roles out of order: tool right after a user turn"),
])
def test_roles_out_of_order(tokenizer, tmp_path, roles, problem):
    record = {"messages": [{"role": role, "content": f"turn {i}"} for i, role in enumerate(roles)]}
    message = refused(tokenizer, spec(write_jsonl(tmp_path / "t.jsonl", [record])))
    assert f"{tmp_path / 't.jsonl'}:1: {problem}" in message


@pytest.mark.parametrize("message, problem", [
    ({"role": ["user"], "content": "hi"}, "messages[0].role ['user'] is not one of system, user, assistant, tool"),
    ({"role": {"user": 1}, "content": "hi"}, "messages[0].role {'user': 1} is not one of"),
    ({"role": "human", "content": "hi"}, "messages[0].role 'human' is not one of"),
    ({"role": "user", "content": 7}, "messages[0].content must be a string, got int"),
    ({"role": "user", "content": ["hi"]}, "messages[0].content: only text parts"),
    (["user", "hi"], "messages[0] must be an object with role and content"),
])
def test_a_message_of_the_wrong_shape_is_named(tokenizer, tmp_path, message, problem):
    record = {"messages": [message, {"role": "assistant", "content": "hello"}]}
    assert problem in refused(tokenizer, spec(write_jsonl(tmp_path / "t.jsonl", [record])))


def test_sharegpt_roles_out_of_order(tokenizer, tmp_path):
    record = {"conversations": [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "hi"},
                                {"from": "gpt", "value": "How can I help?"}]}
    message = refused(tokenizer, spec(write_jsonl(tmp_path / "t.jsonl", [record])))
    assert "conversations[0]: roles out of order: assistant at the start, expected user" in message


def test_column_mapping_naming_a_missing_column(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "response": "a"}])
    message = refused(tokenizer, spec(path, columns={"instruction": "question", "output": "answer"}))
    assert message == (f"{path}:1: data.columns maps output → 'answer', but the record has no such column (its "
                       "columns: question, response); fix data.columns to name one of the file's columns")


def test_column_mapping_of_an_optional_field_may_skip_records_but_not_all(tokenizer, tmp_path):
    rows = [{"q": "a", "r": "b"}, {"q": "c", "r": "d", "persona": "Be brief."}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    mapped = {"instruction": "q", "output": "r", "system": "persona"}
    data = prepare_data(spec(path, columns=mapped, eval_fraction=0), tokenizer, seed=0)
    assert "<|system|>\nBe brief." in tokenizer.decode(data.train[1]["input_ids"])
    message = refused(tokenizer, spec(path, columns=mapped | {"system": "persona_"}))
    assert message == (f"{path}: data.columns maps system → 'persona_', but no record has such a column; fix "
                       "data.columns to name one of the file's columns")


@pytest.mark.parametrize("rows, kw, step", [
    ([{"text": "word " * 60}] * 2, {"max_seq_len": 16, "too_long": "drop"},
     "the too long step removed everything: every example is longer than data.max_seq_len = 16 tokens "
     "(data.too_long: drop); raise data.max_seq_len or set data.too_long: truncate"),
    ([chat("q", " "), chat("r", "\t")], {}, "the empty step removed everything: no record has text to train on"),
    (["{bad", "{worse"], {"clean": {"max_bad_fraction": 1}}, "the malformed step removed everything: every record"),
])
def test_dataset_empty_after_cleaning_names_the_step(tokenizer, tmp_path, rows, kw, step):
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    message = refused(tokenizer, spec(path, **kw))
    assert message.startswith(f"no training records left in {path} (read 2, ") and step in message


def test_object_storage_inputs_are_read_from_their_local_copy_only(tokenizer):
    """The CLI and the trainer fetch s3:// data first (tests/e2e/test_data_governance.py); unfetched, it is refused."""
    message = refused(tokenizer, spec("s3://bucket/data/train.jsonl"))
    assert "object-storage data (s3://) is read from its local copy; fetch it first" in message

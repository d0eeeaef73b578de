"""`tunerun data prepare|inspect` as a user runs them: a job file, a model folder, a data file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SUPPORT = REPO / "examples" / "data" / "support_tickets.jsonl"


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    (tmp_path / "job.yaml").write_text(f"name: data-demo\nmodel: {{path: {tiny_model_dir}}}\nmethod: {{kind: lora}}\n"
                                       f"data: {{train: {SUPPORT}, max_seq_len: 256}}\n")
    return tmp_path


def test_prepare_writes_the_cache_then_reuses_it(tunerun, project):
    first = tunerun("data", "prepare", "job.yaml", "--cache-dir", "cache", "--out", "prepared", cwd=project)
    assert first.returncode == 0, first.stderr
    summary = "data   600 records (chat) → 588 kept (duplicates 5, near-duplicates 3, fuzzy duplicates 4)"
    assert summary in first.stdout
    assert "PII    masked 360:" in first.stdout and "person 310" in first.stdout and "(prepared)" in first.stdout
    report = json.loads((project / "prepared" / "data_report.json").read_text())
    assert report["train_records"] + report["eval_records"] == 588
    assert {p.name for p in (project / "prepared").iterdir()} >= {"train.jsonl", "eval.jsonl", "data_report.html",
                                                                "data_report.png"}
    again = tunerun("data", "prepare", "job.yaml", "--cache-dir", "cache", cwd=project)
    assert again.returncode == 0 and "(reused from the cache)" in again.stdout
    folder = next(p for p in (project / "cache").iterdir() if not p.name.startswith("."))
    assert f"files  {folder.resolve()}" in again.stdout


def test_inspect_shows_steps_lengths_and_examples_as_the_model_sees_them(tunerun, project):
    result = tunerun("data", "inspect", "job.yaml", "--cache-dir", "cache", "-n", "2",
                     "--set", "data.packing=true", cwd=project)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for step in ("malformed", "empty", "duplicates", "near-duplicates", "fuzzy duplicates", "too long"):
        assert step in out
    assert "tokens min 53 · mean 79.8 · p50 80 · p95 94 · max 142  (data.max_seq_len 256)" in out
    assert "packed 559 examples into" in out
    assert out.count("── example ") == 2
    # The trained span is marked; the prompt is shown as decoded tokens, BOS included.
    assert "<s> <|system|>\nClassify the support ticket.\n<|user|>\n" in out
    assert "<|assistant|>\n⟦category: " in out and "</s>⟧" in out


def test_bad_data_is_one_message_and_exit_2(tunerun, project):
    (project / "bad.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    result = tunerun("data", "prepare", "job.yaml", "--cache-dir", "cache", "--set", "data.train=bad.jsonl",
                     cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert "bad.jsonl:1: unknown record format: found keys ['completion', 'prompt']" in result.stderr


def test_invalid_pii_pattern_fails_validation_with_its_line(tunerun, project, tiny_model_dir):
    (project / "job.yaml").write_text(f"model: {{path: {tiny_model_dir}}}\ndata:\n  train: {SUPPORT}\n  clean:\n"
                                      "    pii_patterns: {TICKET: '#(\\d+'}\n")
    result = tunerun("validate", "job.yaml", cwd=project)
    assert result.returncode == 2
    assert "line 5" in result.stderr
    assert "data.clean.pii_patterns: TICKET: '#(\\d+' is not a valid regular expression (missing ), unterminated " \
           "subpattern at position 1)" in result.stderr

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
    summary = "data   600 records (chat) → 589 kept (duplicates 5, near-duplicates 3, fuzzy duplicates 3)"
    assert summary in first.stdout
    assert "PII    masked 359:" in first.stdout and "person 309" in first.stdout and "(prepared)" in first.stdout
    report = json.loads((project / "prepared" / "data_report.json").read_text())
    assert report["train_records"] + report["eval_records"] == 589
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
    assert "tokens min 53 · mean 79.7 · p50 80 · p95 94 · max 142  (data.max_seq_len 256)" in out
    assert "packed 560 examples into" in out
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


def test_cache_prune_removes_only_what_it_says_it_removes(tunerun, project):
    """Three prepared sets (different max_seq_len), one unused for 40 days, plus a crashed preparation's
    hidden folder and one that is still running; `TUNERUN_CACHE` moves the cache."""
    import os
    import time

    env = {**os.environ, "TUNERUN_CACHE": str(project / "moved")}
    (project / "small.jsonl").write_text("".join(json.dumps({"text": f"record {i} " * 5}) + "\n" for i in range(12)))
    for length in (64, 128, 256):
        done = tunerun("data", "prepare", "job.yaml", "--set", "data.train=small.jsonl", "--set",
                       f"data.max_seq_len={length}", cwd=project, env=env)
        assert done.returncode == 0, done.stderr
    root = project / "moved" / "prepared"
    entries = sorted(p for p in root.iterdir())
    assert len(entries) == 3
    now = time.time()
    old, middle, newest = entries
    for folder, days in ((old, 40), (middle, 2), (newest, 0)):
        os.utime(folder / "COMPLETE", (now - days * 86400, now - days * 86400))
    crashed, running = root / ".deadbeef-crashed", root / ".cafe-running"
    for folder, hours in ((crashed, 30), (running, 0)):
        folder.mkdir()
        (folder / "train.jsonl").write_text("{}\n")
        os.utime(folder, (now - hours * 3600, now - hours * 3600))

    listed = tunerun("data", "cache", "list", cwd=project, env=env)
    assert listed.returncode == 0, listed.stderr
    assert all(p.name in listed.stdout for p in entries) and "5 entries" in listed.stdout
    assert listed.stdout.index(newest.name) < listed.stdout.index(old.name)  # most recently used first

    dry = tunerun("data", "cache", "prune", "--older-than", "30d", "--dry-run", cwd=project, env=env)
    assert f"would remove {old.name}" in dry.stdout and old.exists()
    pruned = tunerun("data", "cache", "prune", "--older-than", "30d", cwd=project, env=env)
    assert pruned.returncode == 0, pruned.stderr
    said = {line.split()[1] for line in pruned.stdout.splitlines() if line.startswith("removed ")}
    assert said == {old.name, crashed.name}
    assert {p.name for p in root.iterdir()} == {middle.name, newest.name, running.name}

    size = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    by_size = tunerun("data", "cache", "prune", "--keep-bytes", f"{size + 10}B", cwd=project, env=env)
    said = {line.split()[1] for line in by_size.stdout.splitlines() if line.startswith("removed ")}
    assert said == {middle.name}  # least recently used first; the running preparation is never chosen
    assert {p.name for p in root.iterdir()} == {newest.name, running.name}

    again = [tunerun("data", "prepare", "job.yaml", "--set", "data.train=small.jsonl", "--set",
                     f"data.max_seq_len={length}", cwd=project, env=env).stdout for length in (64, 128, 256)]
    assert sum("(prepared)" in out for out in again) == 2  # the pruned sets are simply prepared again
    assert sum("(reused from the cache)" in out for out in again) == 1
    bad = tunerun("data", "cache", "prune", "--older-than", "soon", cwd=project, env=env)
    assert bad.returncode == 2 and "30d" in bad.stderr


def test_validate_says_how_to_install_a_missing_spacy_pipeline(tunerun, project):
    result = tunerun("validate", "job.yaml", "--set", "data.clean.ner={model: en_core_web_lg, languages: [en, de]}",
                     cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data.clean.ner" in result.stderr and "spaCy pipeline en_core_web_lg is not installed" in result.stderr
    assert "python -m spacy download en_core_web_lg" in result.stderr and "data.clean.ner: null" in result.stderr
    entities = tunerun("validate", "job.yaml", "--set", "data.clean.pii_entities=[email, location]", cwd=project)
    assert entities.returncode == 2 and "LOCATION can only be found by a named-entity model" in entities.stderr

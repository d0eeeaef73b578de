"""`tunerun eval`, `export`, `report` and the gates in `status`, as a user meets them through the CLI.

The report is opened in a real headless browser (Debian's chromium, installed by scripts/install-system-deps):
the page must render, its charts must be <img> elements with data: URIs, and its tables must be there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_the_commands_are_registered(tunerun):
    result = tunerun("--help", cwd=REPO)
    for command in ("eval", "export", "report"):
        assert f"  {command} " in result.stdout
    help_text = tunerun("export", "--help", cwd=REPO).stdout
    assert "--merge" in help_text and "[hf|gguf]" in help_text and "[f16|q8_0|q4_k_m|f32]" in help_text


# ── a finished run folder, as the train loop leaves it ──────────────────────────────────────────────────────

EXAMPLES = [
    {"index": 0, "prompt": "<|user|>\nMy invoice is wrong\n<|assistant|>\n", "reference": "category: billing"},
    {"index": 1, "prompt": "<|user|>\nI can't log in\n<|assistant|>\n", "reference": "category: login"},
    {"index": 2, "prompt": "<|user|>\n<script>alert('x')</script>\n<|assistant|>\n", "reference": "category: bug"},
]


def eval_record(step: int, phase: str, exact: float, outputs: list[str]) -> dict:
    return {"step": step, "phase": phase, "base": phase == "base", "time": 0.0,
            "metrics": {"loss": 12.0 / (1 + step), "perplexity": 2.0 + 100 / (1 + step), "exact_match": exact,
                        "f1": exact, "rouge_l": min(1.0, exact + 0.1), "generated": 3},
            "examples": [{**e, "output": o} for e, o in zip(EXAMPLES, outputs)],
            "general": {"exact_match": 0.1, "f1": 0.2, "rouge_l": 0.3, "generated": 30}}


@pytest.fixture
def finished_run(tmp_path, tiny_model_dir) -> Path:
    from tunerun.jobs.loader import load_job_text
    from tunerun.jobs.plan import resolve

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20)))
    job = resolve(load_job_text(f"name: demo\nmodel: {{path: {tiny_model_dir}}}\ndata: {{train: {data}}}\n"
                                "eval: {gates: {exact_match: '>= 0.8', forgetting_drop: '<= 0.05'}}\n"), run_id="demo")
    run = tmp_path / "runs" / "demo"
    (run / "eval").mkdir(parents=True)
    (run / "data").mkdir()
    (run / "job.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json")))
    gates = {"passed": True, "results": [
        {"metric": "exact_match", "condition": ">= 0.8", "value": 0.9, "passed": True},
        {"metric": "forgetting_drop", "condition": "<= 0.05", "value": 0.0, "passed": True}]}
    (run / "run.json").write_text(json.dumps({"run_id": "demo", "state": "succeeded", "target": "local",
                                              "method": "qlora", "gates": gates}))
    rows = [{"step": s, "loss": 10 / s, "lr": 1e-3 * (1 - s / 40), "total_steps": 40} for s in range(1, 41)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = eval_record(0, "base", 0.0, ["zzz", "qq", "</td><b>not bold</b>"])
    mid = eval_record(20, "train", 0.5, ["category: billing", "category: bug", "category: bug"])
    final = eval_record(40, "final", 0.9, ["category: billing", "category: login", "category: bug"])
    final["metrics"].update(forgetting_drop=0.0, forgetting_flagged=False)
    final["gates"] = gates
    for name, record in (("base.json", base), ("step-000020.json", mid), ("step-000040.json", final)):
        (run / "eval" / name).write_text(json.dumps(record))
    (run / "data" / "data_report.json").write_text(json.dumps({
        "records_read": 600, "train_records": 533, "eval_records": 59, "duplicates": 5,
        "pii_masked": {"email": 23, "phone": 25}, "files": ["/data/tickets.jsonl"], "format": "chat"}))
    return run


def test_status_shows_whether_the_gates_passed(tunerun, finished_run):
    storage = str(finished_run.parent)
    result = tunerun("status", "demo", "--storage", storage, cwd=finished_run)
    assert result.returncode == 0, result.stderr
    assert "state succeeded" in result.stdout and "gates passed" in result.stdout
    info = json.loads((finished_run / "run.json").read_text())
    info["gates"]["passed"] = False
    info["gates"]["results"][0].update(value=0.42, passed=False)
    (finished_run / "run.json").write_text(json.dumps(info))
    result = tunerun("status", "demo", "--storage", storage, cwd=finished_run)
    assert "gates failed (exact_match 0.42 not >= 0.8)" in result.stdout, result.stdout


def test_report_is_one_self_contained_html_file(tunerun, finished_run):
    result = tunerun("report", "demo", "--storage", str(finished_run.parent), cwd=finished_run)
    assert result.returncode == 0, result.stderr
    page = (finished_run / "report.html").read_text()
    assert str(finished_run / "report.html") in result.stdout
    assert page.count('src="data:image/png;base64,') == 3  # loss, learning rate, eval metrics
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere
    assert "<script>alert" not in page and "&lt;script&gt;" in page  # example text is escaped
    assert {p.name for p in (finished_run / "report").iterdir()} == {"loss.png", "learning_rate.png",
                                                                     "eval_metrics.png"}


def chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is missing: CI must run scripts/install-system-deps")
    pytest.skip("chromium is not installed here (scripts/install-system-deps installs it)")


def test_report_renders_in_a_headless_browser(tunerun, finished_run, tmp_path):
    browser = chromium()
    assert tunerun("report", "demo", "--storage", str(finished_run.parent), cwd=finished_run).returncode == 0
    url = (finished_run / "report.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,900", url],
                   capture_output=True, text=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000  # not a blank page
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert dom.count('src="data:image/png;base64,') == 3
    for table in ("base-vs-tuned", "gates", "forgetting", "per-eval", "examples", "data-report"):
        assert f'id="{table}"' in dom, table
    assert "<script>alert" not in dom  # the browser saw text, not markup
    assert '<td class="num">0.0000</td><td class="num">0.9000</td>' in dom  # exact_match base → tuned
    assert "not bold" in dom and "<b>not bold</b>" not in dom


# ── bad input ───────────────────────────────────────────────────────────────────────────────────────────────


def test_eval_of_a_run_without_an_eval_set_is_a_user_error(tunerun, finished_run):
    assert_user_error(tunerun("eval", "demo", "--storage", str(finished_run.parent), cwd=finished_run),
                      "data/eval.jsonl is missing", "data.eval_fraction")
    (finished_run / "data" / "eval.jsonl").write_text("")
    assert_user_error(tunerun("eval", "demo", "--storage", str(finished_run.parent), cwd=finished_run),
                      "data/eval.jsonl holds no examples")


def test_export_of_a_run_with_no_weights_or_to_a_blocked_target_is_a_user_error(tunerun, finished_run,
                                                                                 tmp_path):
    storage = str(finished_run.parent)
    assert_user_error(tunerun("export", "demo", "--storage", storage, cwd=tmp_path),
                      "no final weights and no complete checkpoint")
    assert_user_error(tunerun("export", "demo", "--checkpoint", "20", "--storage", storage, cwd=tmp_path),
                      "checkpoint step 20 does not exist")
    assert_user_error(tunerun("export", "demo", "--format", "gguf", "--storage", storage, cwd=tmp_path),
                      "no final weights and no complete checkpoint")
    assert_user_error(tunerun("export", "demo", "--to", "gs://bucket/x", "--storage", storage, cwd=tmp_path),
                      "only local folders and s3:// URIs are export targets")
    assert_user_error(tunerun("export", "nope", "--storage", storage, cwd=tmp_path), "no run 'nope'")


def test_export_through_the_cli_and_to_a_target_that_is_not_writable(tunerun, finished_run, tiny_model_dir,
                                                                     tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapter.save_pretrained(finished_run / "final" / "adapter")
    with (finished_run / "events.jsonl").open("a") as events:
        events.write(json.dumps({"event": "exported", "step": 40}) + "\n")
    storage = str(finished_run.parent)
    (tmp_path / "a-file").write_text("x")
    assert_user_error(tunerun("export", "demo", "--to", str(tmp_path / "a-file" / "out"), "--storage", storage,
                              cwd=tmp_path), "is not writable", "a-file is a file")
    done = tunerun("export", "demo", "--to", str(tmp_path / "out"), "--storage", storage, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"export final → {tmp_path / 'out'}" in done.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()
    assert_user_error(tunerun("export", "demo", "--to", str(tmp_path / "out"), "--storage", storage, cwd=tmp_path),
                      "already exists")


@pytest.mark.parametrize("gates,fragment", [
    ("{exact_macth: '>= 0.8'}", "eval.gates.exact_macth: unknown metric 'exact_macth' — did you mean 'exact_match'?"),
    ("{label_accuracy: '>= 0.8'}", "eval.gates.label_accuracy: metric 'label_accuracy' is not computed"),
    ("{exact_match: '≥ 0.8'}", "eval.gates.exact_match: expected a comparison such as '>= 0.8'"),
])
def test_validate_names_the_bad_gate(tunerun, tmp_path, stub_model_dir, gates, fragment):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "job.yaml").write_text(f"model: {{path: models/m}}\ndata: {{train: t.jsonl}}\neval:\n  gates: {gates}\n")
    assert_user_error(tunerun("validate", "job.yaml", cwd=tmp_path), fragment, "line 4")


def test_validate_refuses_a_metric_that_does_not_exist(tunerun, tmp_path, stub_model_dir):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "job.yaml").write_text("model: {path: models/m}\ndata: {train: t.jsonl}\neval: {metrics: [loss, bleu]}\n")
    assert_user_error(tunerun("validate", "job.yaml", cwd=tmp_path), "eval.metrics.1", "bleu",
                      "loss, exact_match, f1, rouge_l, label_accuracy")

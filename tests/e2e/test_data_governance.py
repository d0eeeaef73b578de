"""PII in a dirty support-ticket export: names, cities, IBANs whose check digits fail, sign-offs; masked by the
rule-based passes and by Presidio over a spaCy NER pipeline that the test trains itself
(`examples/make_tiny_ner.py`: packaged with ``spacy package``, pip-installed into a folder on ``PYTHONPATH``,
loaded by name exactly as ``en_core_web_lg`` would be). Then the same export on the loopback S3 server,
prepared by ``tunerun data prepare`` and trained on by ``tunerun run`` through the same cache.

One preparation per variant (module-scoped): the tests read its files and report.
"""
from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"
pytestmark = pytest.mark.slow

# Names after a greeting or sign-off: the rule-based pass must find these without a model. None of them is in
# the NER pipeline's training lists, so with NER on they show the rule-based pass ran first.
CUE_NAMES = ["José", "Ingrid Larsen", "Mateo Ruiz", "Zoë", "Farid Haddad", "Lindqvist"]
GREETINGS = ["Dear Ms {name},", "Hello {name},", "Hi {name}!"]
SIGN_OFFS = ["Kind regards, {name}", "Best, {name}", "Thanks!\n{name}", "Cheers, {name}"]
# IBANs of the right country length whose check digits do not verify (a typo), and one that does.
BAD_IBANS = ["DE89370400440532013001", "IT61X0542811101000000123456", "GB83WEST12345698765432",
             "FR7630006000011234567890188"]
GOOD_IBAN = "NL91ABNA0417164300"


def make_export(path: Path, ner, n: int = 120, seed: int = 7) -> dict:
    """Chat records with planted values; returns what was planted (values and counts per report kind)."""
    rng = random.Random(seed)
    planted = {"values": set(), "person": 0, "location": 0, "iban": 0, "iban_checksum_failed": 0, "cue": 0}
    lines = []
    for i in range(n):
        parts = []
        if rng.random() < 0.5:
            name = rng.choice(CUE_NAMES)
            parts.append(rng.choice(GREETINGS).format(name=name))
            planted["values"].add(name)
            planted["person"] += 1
            planted["cue"] += 1
        for _ in range(rng.randint(1, 2)):
            text, spans = ner.fill(rng.choice(rng.choice([ner.WITH_PERSON, ner.WITH_CITY, ner.WITH_BOTH])), rng)
            parts.append(text)
            for start, end, label in spans:
                planted["values"].add(text[start:end])
                planted["person" if label == "PERSON" else "location"] += 1
        if i % 3 == 0:
            iban = rng.choice(BAD_IBANS) if i % 2 == 0 else GOOD_IBAN
            parts.append(f"Refund to {iban} please.")
            planted["values"].add(iban)
            planted["iban_checksum_failed" if iban != GOOD_IBAN else "iban"] += 1
        if rng.random() < 0.6:
            name = rng.choice(CUE_NAMES)
            parts.append(rng.choice(SIGN_OFFS).format(name=name))
            planted["values"].add(name)
            planted["person"] += 1
            planted["cue"] += 1
        ticket = f"Ticket {1000 + i}: " + " ".join(parts)  # unique: every record is kept, so counts compare
        answer = f"category: {rng.choice(['billing', 'shipping'])}"
        lines.append(json.dumps({"messages": [{"role": "user", "content": ticket},
                                              {"role": "assistant", "content": answer}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return planted


@pytest.fixture(scope="module")
def governance(tmp_path_factory, tiny_model_dir, example_module):
    root = tmp_path_factory.mktemp("governance")
    ner = example_module("make_tiny_ner")
    site = ner.make_tiny_ner(root / "tiny-ner")
    planted = make_export(root / "export.jsonl", ner)
    (root / "job.yaml").write_text(
        f"name: governance\nmodel: {{path: {tiny_model_dir}}}\nmethod: {{kind: lora}}\n"
        f"data:\n  train: {root / 'export.jsonl'}\n  max_seq_len: 512\n"
        f"  clean: {{near_dedup: false, ner: {{engine: presidio, model: {ner.PACKAGE}, languages: [en, de, it]}}}}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "TUNERUN_CACHE": str(root / "cache")}
    return {"root": root, "planted": planted, "env": env, "package": ner.PACKAGE}


def prepared(governance, tunerun, name: str, *sets: str) -> tuple[Path, dict]:
    """``tunerun data prepare`` into ``<root>/<name>``: (that folder, the data report)."""
    out = governance["root"] / name
    if not (out / "data_report.json").is_file():
        args = [a for s in sets for a in ("--set", s)]
        result = tunerun("data", "prepare", "job.yaml", *args, "--out", str(out), cwd=governance["root"],
                         env=governance["env"])
        assert result.returncode == 0, result.stderr
    return out, json.loads((out / "data_report.json").read_text())


@pytest.fixture(scope="module")
def with_ner(governance, tunerun, tokenizer):
    out, report = prepared(governance, tunerun, "with-ner")
    return decoded(out, tokenizer), report


@pytest.fixture(scope="module")
def without_ner(governance, tunerun, tokenizer):
    out, report = prepared(governance, tunerun, "without-ner", "data.clean.ner=null")
    return decoded(out, tokenizer), report


def decoded(folder: Path, tokenizer) -> str:
    rows = [json.loads(line) for name in ("train.jsonl", "eval.jsonl")
            for line in (folder / name).read_text().splitlines()]
    return "\n".join(tokenizer.decode(row["input_ids"]) for row in rows)


def test_with_ner_no_planted_value_survives_and_the_report_counts_what_was_planted(governance, with_ner):
    text, report = with_ner
    planted = governance["planted"]
    survived = sorted(v for v in planted["values"] if v in text)
    assert survived == []
    for surname in {v.split()[-1] for v in planted["values"] if " " in v}:
        assert surname not in text
    masked = report["pii_masked"]
    assert report["records_read"] == report["train_records"] + report["eval_records"] == 120
    assert {k: masked[k] for k in ("person", "location", "iban", "iban_checksum_failed")} == \
        {k: planted[k] for k in ("person", "location", "iban", "iban_checksum_failed")}
    assert "<PERSON>" in text and "<LOCATION>" in text and "<IBAN>" in text
    assert "Kind regards, <PERSON>" in text or "Best, <PERSON>" in text or "Cheers, <PERSON>" in text
    html = (governance["root"] / "with-ner" / "data_report.html").read_text()
    assert "iban, checksum failed" in html and not any(v in html for v in planted["values"])  # counts, never values


def test_without_ner_the_rule_based_pass_masks_greeting_and_sign_off_names(governance, without_ner):
    text, report = without_ner
    planted = governance["planted"]
    for name in CUE_NAMES:
        assert name not in text
    assert report["pii_masked"]["person"] == planted["cue"]
    assert "location" not in report["pii_masked"]  # no detector for places without a model: not counted as 0
    assert report["pii_masked"]["iban_checksum_failed"] == planted["iban_checksum_failed"]
    assert not any(iban in text for iban in BAD_IBANS)


def test_validate_names_a_missing_spacy_pipeline_and_accepts_an_installed_one(governance, tunerun):
    ok = tunerun("validate", "job.yaml", cwd=governance["root"], env=governance["env"])
    assert ok.returncode == 0, ok.stderr
    missing = tunerun("validate", "job.yaml", "--set", "data.clean.ner.model=en_core_web_lg",
                      cwd=governance["root"], env=governance["env"])
    assert missing.returncode == 2
    assert "data.clean.ner" in missing.stderr and "en_core_web_lg is not installed" in missing.stderr
    assert "python -m spacy download en_core_web_lg" in missing.stderr and "never downloads" in missing.stderr


def test_data_on_s3_is_prepared_by_the_cli_then_trained_on_through_the_same_cache(governance, tunerun,
                                                                                   s3_server, tiny_model_dir):
    bucket = s3_server.bucket(f"governance-{uuid.uuid4().hex[:8]}")
    s3_server.client().upload_file(str(governance["root"] / "export.jsonl"), bucket, "exports/tickets.jsonl")
    # os.environ now: the s3_server fixture put its test credentials there after the module fixture was built.
    env = {**os.environ, "PYTHONPATH": governance["env"]["PYTHONPATH"], "AWS_ENDPOINT_URL_S3": s3_server.endpoint,
           "TUNERUN_CACHE": str(governance["root"] / "s3-cache")}
    sets = [f"model.path={tiny_model_dir}", f"data.train=s3://{bucket}/exports/tickets.jsonl",
            f"storage.endpoint_url={s3_server.endpoint}", f"storage.uri={governance['root'] / 'runs'}",
            "data.clean.near_dedup=false", "data.max_seq_len=512", f"data.clean.ner={{model: {governance['package']}}}"]
    args = [a for s in sets for a in ("--set", s)]
    first = tunerun("data", "prepare", str(QUICKSTART), *args, cwd=governance["root"], env=env)
    assert first.returncode == 0, first.stderr
    assert "(prepared)" in first.stdout and "person" in first.stdout
    prepared_root = governance["root"] / "s3-cache" / "prepared"
    entries = [p for p in prepared_root.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    run = tunerun("run", str(QUICKSTART), *args, "--set", "training.max_steps=2", "--set",
                  "resources.workers_per_node=1", "--run-id", "s3data", cwd=governance["root"], env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert [p for p in prepared_root.iterdir() if not p.name.startswith(".")] == entries  # reused, not re-made
    run_data = governance["root"] / "runs" / "s3data" / "data" / "train.jsonl"
    assert run_data.read_bytes() == (entries[0] / "train.jsonl").read_bytes()
    assert json.loads((governance["root"] / "runs" / "s3data" / "run.json").read_text())["state"] == "succeeded"

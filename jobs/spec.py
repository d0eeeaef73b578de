"""The job spec: one tree of frozen pydantic models, the contract between users, docs and launch templates.

Every field has a default except ``model.path`` and ``data.train``. Cross-field rules (batch arithmetic,
which settings belong to which method) are checked here so that ``validate``, ``plan`` and the workers all
see the same verdict. Loading YAML with line numbers and turning pydantic errors into `Problem`s lives in
`tunerun.jobs.loader`.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
Dtype = Literal["float32", "bfloat16", "float16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def field_error(path: str, message: str) -> PydanticCustomError:
    """A cross-field error that names the field to fix (``path`` is relative to the model raising it)."""
    return PydanticCustomError("spec_field", message.replace("{", "(").replace("}", ")"), {"path": path})


def suggest_name(name: str) -> str:
    """A valid job name as close as possible to ``name`` (lowercase, hyphens, 40 chars)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    cleaned = re.sub(r"-{2,}", "-", cleaned)
    if not cleaned or not cleaned[0].isalpha():
        cleaned = "job-" + cleaned
    return cleaned[:40].rstrip("-") or "job"


class ModelSpec(Strict):
    path: str = Field(description="Local Hugging Face folder (or s3:// prefix) holding config, weights and tokenizer.")
    dtype: Dtype = "bfloat16"
    trust_remote_code: bool = False


class LoraSpec(Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one module name, or 'all-linear'")
        return v


class QuantizationSpec(Strict):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "bfloat16"


class ZeroSpec(Strict):
    stage: Literal[2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self):
        if self.offload_params and self.stage != 3:
            raise field_error("offload_params", "needs stage: 3 (ZeRO-2 does not partition parameters)")
        return self


class MethodSpec(Strict):
    kind: Literal["full", "lora", "qlora", "auto"] = "qlora"
    # A block that does not apply to the kind is None in the resolved job (see tunerun.jobs.plan).
    lora: LoraSpec | None = LoraSpec()
    quantization: QuantizationSpec | None = QuantizationSpec()
    zero: ZeroSpec | None = ZeroSpec()

    @model_validator(mode="after")
    def _settings_fit_kind(self):
        # Defaults for every block are always present; only blocks the user *wrote* must fit the kind.
        belongs = {"lora": {"lora", "qlora"}, "quantization": {"qlora"}, "zero": {"full"}}
        if self.kind == "auto":
            return self
        for block, kinds in belongs.items():
            written = block in self.model_fields_set and getattr(self, block) is not None
            if written and self.kind not in kinds:
                allowed = " or ".join(sorted(kinds))
                raise field_error(
                    block,
                    f"applies to kind {allowed}, not '{self.kind}': "
                    f"remove method.{block} or set method.kind: {sorted(kinds)[0]}",
                )
        return self


class CleanSpec(Strict):
    dedup: bool = True
    near_dedup: bool = True
    pii: Literal["mask", "off"] = "mask"
    max_bad_fraction: float = Field(0.01, ge=0, le=1)


class DataSpec(Strict):
    train: str = Field(description="Path, glob or s3:// URI of the training records.")
    eval: str | None = None
    format: Literal["auto", "chat", "sharegpt", "alpaca", "text"] = "auto"
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    max_seq_len: int = Field(1024, ge=16, le=1_048_576)
    packing: bool = False
    clean: CleanSpec = CleanSpec()


class TrainingSpec(Strict):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(2, ge=1)
    global_batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(2.0e-4, gt=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = True
    seed: int = 42


class EvalSpec(Strict):
    every_steps: int = Field(50, ge=1)
    metrics: list[Literal["loss", "exact_match", "f1", "rouge_l"]] = ["loss", "exact_match", "f1", "rouge_l"]
    gates: dict[str, str] = {}


class CheckpointSpec(Strict):
    every_steps: int = Field(50, ge=1)
    keep_last: int = Field(3, ge=1)


class ResourcesSpec(Strict):
    nodes: int = Field(1, ge=1)
    workers_per_node: int = Field(2, ge=1)
    gpus_per_worker: int = Field(0, ge=0)
    cpus_per_worker: int = Field(1, ge=1)
    max_failures: int = Field(3, ge=0)

    @property
    def num_workers(self) -> int:
        return self.nodes * self.workers_per_node


class StorageSpec(Strict):
    uri: str = "./runs"
    endpoint_url: str | None = None


class SlurmTargetSpec(Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    setup: list[str] = []


class K8sTargetSpec(Strict):
    namespace: str = "default"
    image: str = "tunerun:latest"
    s3_secret: str | None = None


class RayTargetSpec(Strict):
    address: str = "http://127.0.0.1:8265"


class TargetsSpec(Strict):
    slurm: SlurmTargetSpec = SlurmTargetSpec()
    k8s: K8sTargetSpec = K8sTargetSpec()
    ray: RayTargetSpec = RayTargetSpec()


class JobSpec(Strict):
    name: str = "tunerun-job"
    model: ModelSpec
    method: MethodSpec = MethodSpec()
    data: DataSpec
    training: TrainingSpec = TrainingSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    resources: ResourcesSpec = ResourcesSpec()
    storage: StorageSpec = StorageSpec()
    targets: TargetsSpec = TargetsSpec()

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not NAME_PATTERN.match(v):
            raise ValueError(
                "must be a lowercase letter followed by lowercase letters, digits or hyphens, "
                f"at most 40 characters — try '{suggest_name(v)}'"
            )
        return v

    @model_validator(mode="after")
    def _batch_arithmetic(self):
        per_step = self.resources.num_workers * self.training.micro_batch_size
        if self.training.global_batch_size % per_step:
            raise field_error(
                "training.global_batch_size",
                f"must be a multiple of "
                f"workers × micro_batch_size = {self.resources.num_workers} × "
                f"{self.training.micro_batch_size} = {per_step} "
                f"(got {self.training.global_batch_size}); "
                f"try global_batch_size: {per_step * max(1, round(self.training.global_batch_size / per_step))}",
            )
        return self

    @property
    def grad_accumulation(self) -> int:
        return self.training.global_batch_size // (self.resources.num_workers * self.training.micro_batch_size)

"""The job spec: one tree of frozen pydantic models, the contract between users, docs and launch templates.

Every field has a default except ``model.path`` and ``data.train``. Cross-field rules (batch arithmetic,
which settings belong to which method) are checked here so that ``validate``, ``plan`` and the workers all
see the same verdict. Loading YAML with line numbers and turning pydantic errors into `Problem`s lives in
`tunerun.jobs.loader`.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tunerun.jobs import metrics as metric_names  # not `metrics`: EvalSpec has a field of that name

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # variables travel by name to Slurm jobs and Ray runtime envs
HTTP_ADDRESS = re.compile(r"https?://[^\s/]+(/\S*)?")  # a server reached over HTTP (Ray jobs, MLflow)
Dtype = Literal["float32", "bfloat16", "float16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def field_error(path: str, message: str) -> PydanticCustomError:
    """A cross-field error that names the field to fix (``path`` is relative to the model raising it)."""
    return PydanticCustomError("spec_field", message.replace("{", "(").replace("}", ")"), {"path": path})


# What the operating system accepts in a path, checked when the spec loads rather than met as an OSError mid-run.
NAME_MAX_BYTES = 255  # one path component (NAME_MAX on Linux filesystems, HFS+/APFS and NTFS alike)
PATH_MAX_BYTES = 4095  # a whole path: PATH_MAX (4096) less the terminating NUL
S3_KEY_MAX_BYTES = 1024
RUN_FOLDER_ROOM = 200  # what tunerun adds below storage.uri: <run-id>/checkpoints/step-000200/<file>


def os_path_problem(value: str, room: int = 0) -> str | None:
    """Why the OS (or S3) would refuse ``value`` as a path once ``room`` more bytes are added below it, or None."""
    if "\x00" in value:
        return "must not contain NUL bytes: no filesystem accepts them in a name"
    if value.startswith("s3://"):
        key_bytes = len(value.encode("utf-8")) - len("s3://")
        if key_bytes + room > S3_KEY_MAX_BYTES:
            return (f"is {key_bytes} bytes after s3://; S3 keys hold at most {S3_KEY_MAX_BYTES} bytes"
                    + (f" and tunerun adds up to {room} below it" if room else "") + " — use a shorter prefix")
        return None
    if "://" in value:
        return None  # not a filesystem path: other checks name what is expected
    from pathlib import Path

    for part in Path(value).parts:
        size = len(part.encode("utf-8", "surrogatepass"))
        if size > NAME_MAX_BYTES:
            shown = part if len(part) <= 24 else part[:12] + "…" + part[-8:]
            return (f"the name '{shown}' is {size} bytes; filesystems allow at most {NAME_MAX_BYTES} bytes per "
                    "file or folder name — shorten it")
    full = len(str(Path(value).expanduser().absolute()).encode("utf-8", "surrogatepass"))
    if full + room > PATH_MAX_BYTES:
        return (f"is {full} bytes as an absolute path" + (f" (plus up to {room} that tunerun adds below it)" if room
                else "") + f"; the OS allows at most {PATH_MAX_BYTES} — use a shorter path or a symlink to it")
    return None


def os_path(value: str | None, room: int = 0) -> str | None:
    """``value`` if the OS can hold it as a path (with ``room`` bytes added below it); else a ValueError."""
    problem = os_path_problem(value, room) if value is not None else None
    if problem:
        raise ValueError(problem)
    return value


def suggest_name(name: str) -> str:
    """A valid job name as close as possible to ``name`` (lowercase, hyphens, 40 chars)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    cleaned = re.sub(r"-{2,}", "-", cleaned)
    if not cleaned or not cleaned[0].isalpha():
        cleaned = "job-" + cleaned
    return cleaned[:40].rstrip("-") or "job"


class ModelSpec(Strict):
    path: str = Field(description="Local Hugging Face folder (or s3:// prefix) holding config, weights and tokenizer.")
    # Where training starts: a PEFT adapter of this base (a finished run's final/adapter, say) that the method's
    # adapters continue from, and the reference preference tuning compares with. None: fresh adapters.
    adapter: str | None = Field(None, description="PEFT adapter folder (or s3:// prefix) to start from.")
    dtype: Dtype = "bfloat16"
    trust_remote_code: bool = False

    @field_validator("path")
    @classmethod
    def _os_accepts(cls, v: str) -> str:
        return os_path(v, room=len("/model.safetensors.index.json"))

    @field_validator("adapter")
    @classmethod
    def _adapter_os_accepts(cls, v: str | None) -> str | None:
        return None if v is None else os_path(v, room=len("/adapter_model.safetensors"))


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
    # The tensor dtype the packed 4-bit weights live in (bitsandbytes' bnb_4bit_quant_storage). Left out: uint8
    # under DDP; the compute dtype under ZeRO-3, which partitions them like every other parameter of that dtype.
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] | None = None

    def storage_dtype(self, sharded: bool) -> str:
        return self.quant_storage or (self.compute_dtype if sharded else "uint8")


class ZeroSpec(Strict):
    stage: Literal[1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self):
        if self.offload_params and self.stage != 3:
            raise field_error("offload_params", "needs stage: 3 (ZeRO-2 does not partition parameters)")
        return self


class MethodSpec(Strict):
    kind: Literal["full", "lora", "qlora", "auto"] = "qlora"
    # Each block is there exactly when it applies: the kinds in `BLOCKS_FOR` get its defaults when the spec leaves it
    # out, every other kind has None. So what the spec holds is what runs, and a dumped spec reads back the same: a
    # qlora spec with a `zero` block is QLoRA under ZeRO-3, one without it is DDP QLoRA (`auto` sets it when it
    # chooses ZeRO-3). In the resolved job a block that does not apply to the chosen kind is None too.
    lora: LoraSpec | None = None
    quantization: QuantizationSpec | None = None
    zero: ZeroSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_kind(cls, data):
        if not isinstance(data, dict):
            return data
        kind = data.get("kind", "qlora")
        missing = {block: {} for block, kinds in BLOCKS_FOR.items() if kind in kinds and block not in data}
        return {**data, **missing}

    @model_validator(mode="after")
    def _settings_fit_kind(self):
        if self.kind == "auto":
            return self
        for block, kinds in BLOCKS_USED_BY.items():
            if getattr(self, block) is not None and self.kind not in kinds:
                allowed = " or ".join(sorted(kinds))
                raise field_error(
                    block,
                    f"applies to kind {allowed}, not '{self.kind}': "
                    f"remove method.{block} or set method.kind: {sorted(kinds)[0]}",
                )
        if self.sharded_qlora:
            _check_sharded_qlora(self.zero, self.quantization or QuantizationSpec())
        return self

    @property
    def label(self) -> str:
        """What the CLI calls the method: the kind, and ZeRO's stage where DeepSpeed runs it."""
        if self.kind == "full" and self.zero is not None:
            return f"full · ZeRO-{self.zero.stage}"
        return "qlora · ZeRO-3" if self.sharded_qlora else self.kind

    @property
    def sharded_qlora(self) -> bool:
        """QLoRA with a ``zero`` block (written by the user, or set by `auto`): the 4-bit base partitioned by ZeRO-3."""
        return self.kind == "qlora" and self.zero is not None


# The kinds a method block applies to, and the kinds that get its defaults when a spec leaves it out (qlora gets no
# `zero` by default: without one it is DDP QLoRA; auto's LoRA settings size its lora and qlora candidates).
BLOCKS_USED_BY = {"lora": ("lora", "qlora"), "quantization": ("qlora",), "zero": ("full", "qlora")}
BLOCKS_FOR = {"lora": ("lora", "qlora", "auto"), "quantization": ("qlora", "auto"), "zero": ("full",)}


def _check_sharded_qlora(zero: ZeroSpec, quant: QuantizationSpec) -> None:
    if zero.stage != 3:
        raise field_error("zero.stage", f"QLoRA runs under ZeRO stage 3 only (got {zero.stage}): stages 1 and 2 "
                          "partition optimizer states and gradients, which for adapters are already small, and "
                          "leave the whole 4-bit base on every GPU. Set zero.stage: 3 to partition the base, "
                          "or remove method.zero to train QLoRA under DDP")
    if quant.quant_storage not in (None, quant.compute_dtype):
        raise field_error("quantization.quant_storage", f"under ZeRO-3 the packed 4-bit weights must be stored in the "
                          f"compute dtype ({quant.compute_dtype}), not {quant.quant_storage}: DeepSpeed partitions "
                          "and gathers them as parameters of the model's one dtype. Set quant_storage: "
                          f"{quant.compute_dtype} or leave it out")


PII_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")
# The record fields tunerun reads; data.columns maps each to the column name a file uses instead.
DataColumn = Literal["messages", "conversations", "tools", "system", "instruction", "input", "output",
                     "history", "text"]


# Entities tunerun's own detectors find (patterns, checksums, the rule-based name pass); every other Presidio
# entity name (e.g. NRP, DATE_TIME) is found only by the NER model of data.clean.ner.
RULE_ENTITIES = ("EMAIL", "PHONE", "IP_ADDRESS", "IBAN", "CREDIT_CARD", "PERSON", "STREET_ADDRESS")
DEFAULT_PII_ENTITIES = ("EMAIL", "PHONE", "IP_ADDRESS", "IBAN", "CREDIT_CARD", "PERSON", "LOCATION", "STREET_ADDRESS")
ENTITY_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,39}$")


class NerSpec(Strict):
    """A named-entity model for PII masking: Presidio's analyzer over a spaCy pipeline the user installed.

    tunerun never downloads a pipeline (clusters are offline); `tunerun validate` checks it is installed."""

    engine: Literal["presidio"] = "presidio"
    # One spaCy package for every language, or one per language: {en: en_core_web_lg, de: de_core_news_lg}.
    model: str | dict[str, str] = "en_core_web_lg"
    languages: list[str] = Field(["en"], min_length=1)
    score_threshold: float = Field(0.5, ge=0, le=1)  # Presidio's confidence below which a hit is not masked

    @field_validator("languages")
    @classmethod
    def _language_codes(cls, languages: list[str]) -> list[str]:
        for code in languages:
            if not re.fullmatch(r"[a-z]{2,3}", code):
                raise ValueError(f"{code!r}: a language is an ISO 639 code such as en, de or it")
        return languages

    @model_validator(mode="after")
    def _a_model_per_language(self):
        if isinstance(self.model, dict):
            missing = [code for code in self.languages if code not in self.model]
            if missing:
                raise field_error("model", f"names no spaCy package for {', '.join(missing)}: add "
                                  f"{missing[0]}: <package> or list only the languages it covers")
        return self

    def models(self) -> dict[str, str]:
        """language code → spaCy package name."""
        return {code: self.model if isinstance(self.model, str) else self.model[code] for code in self.languages}


class CleanSpec(Strict):
    normalize: bool = True  # NFKC + whitespace
    dedup: bool = True
    near_dedup: bool = True  # normalised-text copies, and MinHash above near_dedup_threshold
    near_dedup_threshold: float = Field(0.85, gt=0, le=1)  # estimated Jaccard similarity; 1 turns MinHash off
    pii: Literal["mask", "off"] = "mask"
    pii_entities: list[str] = list(DEFAULT_PII_ENTITIES)  # masked as <NAME>; LOCATION and the rest need ner
    ner: NerSpec | None = None  # null: tunerun's rule-based detectors only
    pii_patterns: dict[str, str] = {}  # e.g. {EMPLOYEE_ID: 'EMP-\d{6}'} → <EMPLOYEE_ID>
    max_bad_fraction: float = Field(0.01, ge=0, le=1)

    @field_validator("pii_entities", mode="before")
    @classmethod
    def _entity_names(cls, entities):
        if not isinstance(entities, list):
            return entities
        names = [e.upper() if isinstance(e, str) else e for e in entities]
        for name in names:
            if isinstance(name, str) and not ENTITY_NAME.match(name):
                raise ValueError(f"{name!r}: an entity is a Presidio entity name such as PERSON, LOCATION or EMAIL")
        return names

    @model_validator(mode="after")
    def _ner_entities_need_ner(self):
        ner_only = [e for e in self.pii_entities if e not in RULE_ENTITIES]
        if ner_only and self.ner is None and self.pii_entities != list(DEFAULT_PII_ENTITIES):
            # The default list names LOCATION for when a model is configured; a list the user wrote is a promise.
            raise field_error("pii_entities", f"{', '.join(ner_only)} can only be found by a named-entity model: "
                              "set data.clean.ner (e.g. {engine: presidio, model: en_core_web_lg}) or remove them")
        return self

    @field_validator("pii_patterns")
    @classmethod
    def _valid_pii_patterns(cls, patterns: dict[str, str]) -> dict[str, str]:
        # Checked here so a typo in a regex fails `tunerun validate`, not a data preparation an hour later.
        for name, pattern in patterns.items():
            if not PII_NAME_PATTERN.match(name):
                raise ValueError(f"{name!r}: a pattern name is a letter followed by letters, digits or '_' "
                                 "(it becomes the placeholder, e.g. EMPLOYEE_ID → <EMPLOYEE_ID>)")
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{name}: '{pattern}' is not a valid regular expression ({e.msg} at position "
                                 f"{e.pos}); write it in Python re syntax, e.g. EMPLOYEE_ID: 'EMP-\\d{{6}}'") from None
            if compiled.fullmatch(""):
                raise ValueError(f"{name}: '{pattern}' matches the empty string, so it would mask between every "
                                 "character; make it require at least one character (e.g. + instead of *)")
        return patterns


class DataSpec(Strict):
    train: str = Field(description="Path, glob or s3:// URI of the training records.")
    eval: str | None = None
    format: Literal["auto", "chat", "sharegpt", "alpaca", "text", "openai_preference", "trl_preference",
                    "sharegpt_ranking", "alpaca_ranking"] = "auto"
    columns: dict[DataColumn, str] = {}  # tunerun field → the file's column, e.g. {output: answer}
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    max_seq_len: int = Field(1024, ge=16, le=1_048_576)
    too_long: Literal["truncate", "drop"] = "truncate"
    packing: bool = False
    clean: CleanSpec = CleanSpec()

    @field_validator("train", "eval")
    @classmethod
    def _os_accepts(cls, v: str | None) -> str | None:
        return os_path(v)


HELD_OUT_SFT = ("loss", "perplexity")  # what eval.metrics' "loss" stands for in the eval spec alone


class DPOSpec(Strict):
    """Direct preference optimisation (`tunerun.trainer.objectives.dpo`); the defaults are the ones measured to
    work on a small model (README, "Preference tuning")."""

    # How far the tuned model may move from the reference to honour a preference: larger keeps it closer.
    beta: float = Field(0.1, gt=0, le=10)
    # Weight of the preferred answer's own next-token loss beside the preference loss (TRL's rpo_alpha). Without
    # it, DPO can lower both answers' likelihood and the text degenerates while the preference is learned.
    nll_weight: float = Field(1.0, ge=0, le=100)


class TrainingSpec(Strict):
    # What the model learns from each record: its batches, loss and held-out metrics (`tunerun.trainer.objectives`,
    # one module each, registered under these names). sft: next-token loss on the assistant's tokens; dpo: prefer
    # the chosen answer of a preference pair over the rejected one.
    objective: Literal["sft", "dpo"] = "sft"
    dpo: DPOSpec | None = None  # there exactly when objective is dpo (its defaults when the spec leaves it out)
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

    @model_validator(mode="before")
    @classmethod
    def _dpo_defaults(cls, data):
        if isinstance(data, dict) and data.get("objective") == "dpo" and data.get("dpo") is None:
            return {**data, "dpo": {}}
        return data

    @model_validator(mode="after")
    def _dpo_block_fits(self):
        if self.dpo is not None and self.objective != "dpo":
            raise field_error("dpo", f"applies to objective dpo, not '{self.objective}': remove training.dpo or set "
                              "training.objective: dpo")
        return self


class EvalSpec(Strict):
    """Held-out loss, generation metrics, the forgetting check and the gates a run is judged by.

    Gate metric names and operators are checked here, at load, so a typo fails `validate` rather than the
    end of a long run. `tunerun.trainer.evaluation` computes the metrics and applies `gate_checks()`.
    """

    every_steps: int = Field(50, ge=1)
    metrics: list[Literal[metric_names.REQUESTABLE]] = ["loss", *metric_names.GENERATION]
    max_new_tokens: int = Field(64, ge=1, le=32768)
    max_examples: int = Field(200, ge=1)  # generation is the slow part of an eval: cap the examples it sees
    # Prompts per generate call on each worker. Under ZeRO-3 every forward gathers all the weights whatever the
    # batch, so a larger batch makes fewer gathers; it costs a KV cache per prompt.
    generation_batch_size: int = Field(8, ge=1, le=1024)
    label_pattern: str | None = None  # regex, group 1 = the label, e.g. "^category: (\\w+)" → label_accuracy
    general: str | None = "default"  # general-instructions file for the forgetting check; default = bundled; null = off
    forgetting_metric: Literal[metric_names.GENERATION] = "rouge_l"
    forgetting_threshold: float = Field(0.05, ge=0, le=1)
    gates: dict[str, str] = {}

    @field_validator("label_pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                groups = re.compile(v).groups
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
            if groups > 1:
                raise ValueError(f"use at most one capture group, the label (got {groups})")
        return v

    @field_validator("general")
    @classmethod
    def _general_file(cls, v: str | None) -> str | None:
        # Made absolute here, like data paths, because workers do not run in the submitter's directory.
        if v is None or v == "default" or "://" in v:
            return v
        os_path(v)
        from pathlib import Path

        path = Path(v).expanduser().absolute()
        if not path.is_file():
            raise ValueError(f"{path} does not exist; name a JSONL file of general instructions, 'default' for "
                             "the bundled set, or null to skip the forgetting check")
        return str(path)

    @field_validator("gates", mode="before")
    @classmethod
    def _gate_values_as_text(cls, v):
        # `exact_match: 0.8` has no direction; keep it as text so the gate check can say what to write instead.
        return {k: str(x) for k, x in v.items()} if isinstance(v, dict) else v

    @field_validator("gates")
    @classmethod
    def _gates_computed(cls, gates: dict[str, str], info) -> dict[str, str]:
        """Every bad gate at once, each under its own path (eval.gates.<metric>)."""
        from pydantic import ValidationError
        from pydantic_core import InitErrorDetails

        settled = all(k in info.data for k in ("metrics", "label_pattern", "general"))
        computed = cls._computed(info.data["metrics"], info.data["label_pattern"], info.data["general"]) \
            if settled else None
        # Names with control characters are already refused by the loader: one problem per mistake.
        problems = [(name, cls._gate_problem(name, text, computed), text) for name, text in gates.items()
                    if name.isprintable()]
        errors = [InitErrorDetails(type=field_error(name, problem), loc=(), input=text)
                  for name, problem, text in problems if problem]
        if errors:
            raise ValidationError.from_exception_data("EvalSpec", errors)
        return gates

    @model_validator(mode="after")
    def _label_accuracy_needs_pattern(self):
        if "label_accuracy" in self.metrics and self.label_pattern is None:
            raise field_error("metrics", "label_accuracy needs eval.label_pattern, the regex that extracts the label")
        return self

    def computed_metrics(self) -> list[str]:
        """Every metric name a run with this spec produces (the names gates may use)."""
        return self._computed(self.metrics, self.label_pattern, self.general)

    @staticmethod
    def _computed(metrics: list[str], label_pattern: str | None, general: str | None) -> list[str]:
        names = [m for m in metric_names.GENERATION if m in metrics]
        if "loss" in metrics:
            names += list(HELD_OUT_SFT)
        if label_pattern is not None:
            names.append("label_accuracy")
        if general is not None:
            names.append("forgetting_drop")
        return names

    @classmethod
    def _gate_problem(cls, name: str, text: str, computed: list[str] | None) -> str | None:
        import difflib

        known = list(metric_names.GATEABLE)
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else f"; known metrics: {', '.join(known)}"
            return f"unknown metric '{name}'{hint}"
        if computed is not None and name not in computed and name not in metric_names.PREFERENCE:  # job's check
            needs = {"forgetting_drop": "set eval.general (the forgetting check is off)",
                     "label_accuracy": "set eval.label_pattern",
                     "perplexity": "add loss to eval.metrics"}
            return f"metric '{name}' is not computed by this job: {needs.get(name, f'add {name} to eval.metrics')}"
        if cls.parse_gate(text) is None:
            return f"expected a comparison such as '>= 0.8' (operators >=, >, <=, <, ==), got '{text}'"
        return None

    @staticmethod
    def parse_gate(text: str) -> tuple[str, float] | None:
        """``">= 0.8"`` → ``(">=", 0.8)``; None when it is not a comparison with a number."""
        match = re.fullmatch(r"\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", text)
        return (match.group(1), float(match.group(2))) if match else None

    def gate_checks(self) -> list[tuple[str, str, float]]:
        """(metric, operator, threshold) for every gate; valid by construction."""
        return [(name, *self.parse_gate(text)) for name, text in self.gates.items()]


class CheckpointSpec(Strict):
    """Retention: a checkpoint survives when it is among the ``keep_last`` newest complete ones or the
    ``keep_best`` best by ``best_metric`` (lower is better for loss, perplexity and rejected_logp:
    `tunerun.jobs.metrics`)."""

    every_steps: int = Field(50, ge=1)
    keep_last: int = Field(3, ge=1)
    keep_best: int = Field(0, ge=0)  # 0: off
    best_metric: Literal[metric_names.EVAL_SET] = "loss"

    @property
    def best_is_lowest(self) -> bool:
        return metric_names.lower_is_better(self.best_metric)


class ResourcesSpec(Strict):
    nodes: int = Field(1, ge=1)
    workers_per_node: int = Field(2, ge=1)
    gpus_per_worker: int = Field(0, ge=0)
    cpus_per_worker: int = Field(1, ge=1)
    max_failures: int = Field(3, ge=0)
    # What the memory planner checks candidates against (10^9 bytes); `method: auto` on GPUs needs gpu_memory_gb.
    gpu_memory_gb: float | None = Field(None, gt=0)  # memory of one GPU
    cpu_memory_gb: float | None = Field(None, gt=0)  # RAM of one node (CPU offload; CPU workers share it)

    @property
    def num_workers(self) -> int:
        return self.nodes * self.workers_per_node


class StorageSpec(Strict):
    uri: str = "./runs"
    endpoint_url: str | None = None  # MinIO / Ceph RGW; credentials only from AWS_* variables or a profile
    region: str | None = None
    verify_tls: bool = True
    ca_bundle: str | None = None  # a private CA's PEM file, for on-prem endpoints with their own certificates
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # boto3 1.36+ sends integrity checksums some S3-compatible servers reject; "when_required" is the safe
    # choice for a custom endpoint, "when_supported" is AWS's default. None picks by endpoint.
    checksums: Literal["when_required", "when_supported"] | None = None

    @field_validator("ca_bundle")
    @classmethod
    def _os_accepts(cls, v: str | None) -> str | None:
        return os_path(v)

    @field_validator("uri")
    @classmethod
    def _s3_uri_has_bucket(cls, v: str) -> str:
        os_path(v, room=RUN_FOLDER_ROOM)
        if v.startswith("s3://"):
            bucket = v[5:].split("/", 1)[0]
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"'{bucket}' is not a valid bucket name (3–63 lowercase letters, digits, dots, "
                                 "hyphens); expected s3://bucket/prefix")
        elif "://" in v:
            raise ValueError("expected a local folder or s3://bucket/prefix")
        return v

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def checksum_mode(self) -> str:
        return self.checksums or ("when_required" if self.endpoint_url else "when_supported")


class MlflowSpec(Strict):
    """A self-hosted MLflow tracking server fed from world rank 0. Credentials only from the standard variables
    (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD), never from the spec."""

    tracking_uri: str
    experiment: str = "tunerun"
    run_name: str | None = None  # None: the tunerun run id
    tags: dict[str, str] = {}
    log_artifacts: bool = True  # report.html, data_report.json and the eval JSONs at the end of the run
    # validate/run ask the server before training; off for a server only the cluster can reach
    check_reachable: bool = True

    @field_validator("tracking_uri")
    @classmethod
    def _http(cls, v: str) -> str:
        if not HTTP_ADDRESS.fullmatch(v):
            raise ValueError(f"{v!r}: expected the tracking server's HTTP address, e.g. http://mlflow:5000 "
                             "(file: and databricks URIs are not supported: runs train on other machines)")
        if re.match(r"https?://[^/@]*@", v):
            raise ValueError("must not hold credentials: set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                             "(or MLFLOW_TRACKING_TOKEN) in the environment instead")
        return v.rstrip("/")

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if not v.strip() or len(v) > 500:
            raise ValueError("must be a non-empty experiment name of at most 500 characters")
        return v

    @field_validator("tags")
    @classmethod
    def _tag_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key.startswith(("mlflow.", "tunerun.")):
                raise ValueError(f"tag {key!r}: the mlflow. and tunerun. prefixes are set by tunerun itself")
        return v


class TrackingSpec(Strict):
    mlflow: MlflowSpec | None = None
    tensorboard: bool = False  # event files under <run folder>/tensorboard/

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.tensorboard


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
    tracking: TrackingSpec = TrackingSpec()
    # Each target's own settings, by target name; the target module declares and checks them
    # (`tunerun.cluster.targets.Target.Settings`), when the CLI or the service loads the job.
    targets: dict[str, dict[str, Any]] = {}

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

    @model_validator(mode="after")
    def _objective_fits(self):
        """What the objective cannot do: pack its examples, or train without adapters (`tunerun.trainer.objectives`,
        torch-free: each objective says so itself)."""
        from tunerun.trainer.objectives import objective_for

        objective = objective_for(self)
        if self.data.packing and not objective.packs:
            raise field_error("data.packing", f"{objective.NAME} cannot pack examples ({objective.packing_refusal}): "
                              f"set data.packing: false for objective {self.training.objective}")
        if self.model.adapter is not None and self.method.kind == "full":
            raise field_error("model.adapter", "a full fine-tune trains every weight, not adapters: start it from "
                              "merged weights as model.path (tunerun export RUN --merge), or use method.kind lora "
                              "or qlora to continue the adapter")
        return self

    @model_validator(mode="after")
    def _gates_fit_objective(self):
        computed = self.computed_metrics()
        for name in self.eval.gates:
            if name in metric_names.PREFERENCE and name not in computed:
                raise field_error(f"eval.gates.{name}", f"metric '{name}' is measured on held-out preference pairs, "
                                  f"not by training.objective {self.training.objective}; set training.objective: dpo")
        return self

    def computed_metrics(self) -> list[str]:
        """Every metric name this job produces: the eval spec's, the held-out ones as its objective names them
        (sft: loss and perplexity; dpo: loss and the preference metrics)."""
        from tunerun.trainer.objectives import objective_for

        names = self.eval.computed_metrics()
        if "loss" not in names:
            return names
        at = names.index("loss")
        return names[:at] + list(objective_for(self).held_out) + [n for n in names[at:] if n not in HELD_OUT_SFT]

    @model_validator(mode="after")
    def _best_checkpoint_is_scored(self):
        checkpoint, evaluation = self.checkpoint, self.eval
        if not checkpoint.keep_best:
            return self
        if checkpoint.best_metric not in self.computed_metrics():
            raise field_error("checkpoint.best_metric", f"'{checkpoint.best_metric}' is not measured by this job's "
                              f"eval.metrics ({', '.join(evaluation.metrics)}); add it there or pick one of "
                              f"{', '.join(m for m in self.computed_metrics() if m != 'forgetting_drop')}")
        if checkpoint.every_steps % evaluation.every_steps:
            nearest = evaluation.every_steps * max(1, round(checkpoint.every_steps / evaluation.every_steps))
            raise field_error("checkpoint.every_steps", f"keep_best ranks checkpoints by the eval at their step, so "
                              f"every checkpoint needs one: make it a multiple of eval.every_steps "
                              f"({evaluation.every_steps}), e.g. every_steps: {nearest}")
        return self

    @property
    def grad_accumulation(self) -> int:
        return self.training.global_batch_size // (self.resources.num_workers * self.training.micro_batch_size)

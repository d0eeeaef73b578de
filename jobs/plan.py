"""From a validated `JobSpec` to the `ResolvedJob`: every default filled in, paths absolute, method concrete.

The resolved job is the only thing that crosses from the submitter to the workers; it is written into the run
folder as ``job.yaml``. Planning is pure and fast: no torch, no Ray, no network.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tunerun.jobs.data_files import resolve_files
from tunerun.jobs.errors import DataError, Problem, SpecError
from tunerun.jobs.spec import JobSpec, os_path_problem



def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tunerun")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


TUNERUN_VERSION = _installed_version()  # pyproject.toml's [project] version is the one definition


class StepPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    world_size: int
    micro_batch_size: int
    grad_accumulation: int
    global_batch_size: int
    train_records_estimate: int | None  # before cleaning and split; the trainer recounts after preparation
    steps_per_epoch_estimate: int | None
    total_steps_estimate: int | None


class ResolvedJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    spec: JobSpec
    steps: StepPlan
    deepspeed: dict | None  # the exact DeepSpeed config the workers pass to deepspeed.initialize
    method_choice: str | None = None  # why `method: auto` picked spec.method, with the memory planner's numbers
    tunerun_version: str = TUNERUN_VERSION

    @property
    def run_uri(self) -> str:
        return f"{self.spec.storage.uri.rstrip('/')}/{self.run_id}"


def new_run_id(name: str, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{name}-{now:%Y%m%d-%H%M%S}"


def resolve(spec: JobSpec, run_id: str | None = None, source: str = "job") -> ResolvedJob:
    """Fill in what the spec leaves implicit. Raises SpecError for what can only be checked here."""
    problems: list[Problem] = []
    choice = None
    if spec.method.kind == "auto":
        spec, choice = _choose_method(spec, problems)
    spec = _absolute_paths(spec, problems)
    spec = _starting_adapter(spec, problems)
    _check_ner_setup(spec, problems)
    _check_offload_ram(spec, problems)
    if run_id is not None and (problem := _run_id_problem(run_id)):
        problems.append(Problem("--run-id", problem))
    if problems:
        raise SpecError(source, problems)
    return ResolvedJob(
        run_id=run_id or new_run_id(spec.name),
        spec=spec,
        steps=_step_plan(spec),
        deepspeed=deepspeed_config(spec),
        method_choice=choice,
    )


def _run_id_problem(run_id: str) -> str | None:
    """A run id names a folder (and an object prefix): a name the OS accepts. (Which characters each target
    accepts in it is the target's check: `tunerun.cluster.k8s`.)"""
    return os_path_problem(run_id)


def _choose_method(spec: JobSpec, problems: list[Problem]) -> tuple[JobSpec, str | None]:
    """`method: auto`: the memory planner picks the cheapest method that fits (see `tunerun.jobs.memory`).

    The user's lora and quantization blocks are kept for the adapter candidates; ZeRO settings are chosen here.
    """
    from tunerun.jobs import memory
    from tunerun.jobs.spec import ZeroSpec

    if _is_remote(spec.model.path):
        problems.append(Problem("method.kind", "'auto' reads the model's config.json, so model.path must be a "
                                "local folder; choose full, lora or qlora"))
        return spec, None
    if not (Path(spec.model.path).expanduser() / "config.json").is_file():
        return spec, None  # _absolute_paths reports the missing model folder
    hardware = memory.hardware_for(spec)
    if hardware.device_bytes is None:
        problems.append(Problem("resources.gpu_memory_gb", "method.kind auto needs the memory of one GPU to choose "
                                "a method, e.g. gpu_memory_gb: 80 (or `tunerun plan --gpu-memory 80GB`)"))
        return spec, None
    try:
        plan = memory.plan_memory(spec, hardware)
    except memory.MemoryPlanError as exc:
        problems.append(Problem("method.kind", f"'auto' cannot size this model: {exc}; choose full, lora or qlora"))
        return spec, None
    chosen = memory.choose(plan.candidates)
    if chosen is None:
        problems.append(Problem("method.kind", memory.explain_refusal(plan.candidates, hardware)))
        return spec, None
    # full ZeRO or QLoRA under ZeRO-3 carry the chosen zero block; any other choice none (a qlora with one is ZeRO-3)
    update: dict = {"kind": chosen.kind, "zero": ZeroSpec(**chosen.zero) if chosen.zero is not None else None}
    method = spec.method.model_copy(update=update)
    return spec.model_copy(update={"method": method}), memory.explain_choice(chosen, plan.candidates, hardware)


ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name for an adapter's settings


def _starting_adapter(spec: JobSpec, problems: list[Problem]) -> JobSpec:
    """``model.adapter``: a local one must be a PEFT LoRA adapter, and the job trains its shape (rank, alpha, target
    modules), so the resolved job says what runs. One on S3 is read when the trainer fetches it."""
    adapter = spec.model.adapter
    if adapter is None or _is_remote(adapter) or spec.method.lora is None:
        return spec
    config_file = Path(adapter) / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or exc
        problems.append(Problem("model.adapter", f"{adapter} is not a PEFT adapter folder ({ADAPTER_CONFIG}: {why}); "
                                "name one, e.g. runs/<run id>/final/adapter"))
        return spec
    if config.get("peft_type") != "LORA":
        problems.append(Problem("model.adapter", f"{adapter} holds a {config.get('peft_type')} adapter; tunerun "
                                "continues LoRA adapters"))
        return spec
    targets = config.get("target_modules")
    lora = spec.method.lora.model_copy(update={
        "r": config.get("r", spec.method.lora.r), "alpha": config.get("lora_alpha", spec.method.lora.alpha),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets or "all-linear"})
    return spec.model_copy(update={"method": spec.method.model_copy(update={"lora": lora})})


def _absolute_paths(spec: JobSpec, problems: list[Problem]) -> JobSpec:
    """Relative paths are relative to the directory the command runs in (as in Axolotl and LLaMA-Factory)."""
    model_path = Path(spec.model.path).expanduser()
    if not _is_remote(spec.model.path):
        if not (model_path / "config.json").is_file():
            what = "does not exist" if not model_path.exists() else "has no config.json"
            problems.append(Problem("model.path", f"{model_path.resolve()} {what}; expected a Hugging Face model "
                                    "folder (config.json, weights, tokenizer)"))
        model_path = model_path.resolve()
    data = spec.data.model_copy(update={
        "train": _absolute(spec.data.train),
        "eval": _absolute(spec.data.eval) if spec.data.eval else None,
    })
    for field, value in (("data.train", data.train), ("data.eval", data.eval)):
        if not value or _is_remote(value):
            continue
        try:
            resolve_files(value)
        except DataError as exc:
            problems.append(Problem(field, str(exc)))
            continue
        if count_records(value) == 0:
            problems.append(Problem(field, f"{value} holds no records; expected one JSON object per line"))
    storage = spec.storage.model_copy(update={"uri": _absolute(spec.storage.uri)})
    adapter = spec.model.adapter
    path = str(model_path) if not _is_remote(spec.model.path) else spec.model.path
    model = spec.model.model_copy(update={"path": path, "adapter": _absolute(adapter) if adapter else None})
    return spec.model_copy(update={"model": model, "data": data, "storage": storage, "method": _method_blocks(spec)})


def _check_ner_setup(spec: JobSpec, problems: list[Problem]) -> None:
    """The spaCy pipeline must be installed where the data is prepared; checked here, where the job is resolved
    (the submitting shell, and again by the run's driver before it prepares the data)."""
    from tunerun.jobs.ner_setup import missing_ner_setup

    clean = spec.data.clean
    if clean.pii == "mask" and clean.ner is not None and (why := missing_ner_setup(clean.ner)):
        problems.append(Problem("data.clean.ner", why))


def _check_offload_ram(spec: JobSpec, problems: list[Problem]) -> None:
    """Offloading to CPU memory the nodes do not have fails mid-run, after the model loaded: refuse it here when
    the spec says what a node has (the run's driver checks again with the RAM of the node it runs on)."""
    from tunerun.jobs.memory import GB, offload_ram_problem

    if spec.resources.cpu_memory_gb and (problem := offload_ram_problem(spec, spec.resources.cpu_memory_gb * GB)):
        problems.append(Problem("method.zero", problem))


def _method_blocks(spec: JobSpec):
    """Keep only the settings blocks the chosen method uses, so the resolved job shows what applies."""
    method = spec.method
    kind = method.kind
    return method.model_copy(update={
        "lora": method.lora if kind in ("lora", "qlora") else None,
        "quantization": method.quantization if kind == "qlora" else None,
        "zero": method.zero if kind == "full" or method.sharded_qlora else None,
    })


def _is_remote(uri: str) -> bool:
    return "://" in uri


def _absolute(path: str) -> str:
    return path if _is_remote(path) else str(Path(path).expanduser().absolute())


def _step_plan(spec: JobSpec) -> StepPlan:
    records = count_records(spec.data.train)
    train_records = steps_per_epoch = total = None
    if records is not None:
        held_out = 0 if spec.data.eval else (max(1, round(records * spec.data.eval_fraction))
                                             if spec.data.eval_fraction > 0 and records >= 2 else 0)
        train_records = records - held_out
        steps_per_epoch = max(1, math.ceil(train_records / spec.training.global_batch_size))
    if spec.training.max_steps:
        total = spec.training.max_steps
    elif steps_per_epoch:
        total = steps_per_epoch * spec.training.epochs
    return StepPlan(
        world_size=spec.resources.num_workers,
        micro_batch_size=spec.training.micro_batch_size,
        grad_accumulation=spec.grad_accumulation,
        global_batch_size=spec.training.global_batch_size,
        train_records_estimate=train_records,
        steps_per_epoch_estimate=steps_per_epoch,
        total_steps_estimate=total,
    )


@functools.lru_cache(maxsize=16)
def count_records(pattern: str) -> int | None:
    """Records in local JSONL/JSON files, counted cheaply (None for remote data or other formats)."""
    if _is_remote(pattern):
        return None
    total = 0
    try:
        files = resolve_files(pattern)
    except DataError:
        return None  # resolve() reports why
    for file in files:
        if file.suffix not in (".json", ".jsonl"):
            return None  # Parquet/CSV: the trainer counts them after preparation
        text = file.read_text(encoding="utf-8", errors="replace")
        if file.suffix == ".json" and text.lstrip().startswith("["):
            try:
                total += len(json.loads(text))
            except json.JSONDecodeError:
                return None
        else:
            total += sum(1 for line in text.splitlines() if line.strip())
    return total


def deepspeed_config(spec: JobSpec) -> dict | None:
    """The DeepSpeed JSON for `full` runs and QLoRA under ZeRO-3, generated from the spec (users never write it
    by hand)."""
    method = spec.method
    if method.kind != "full" and not method.sharded_qlora:
        return None
    zero = method.zero
    training = spec.training
    # QLoRA computes in the quantization's compute dtype: DeepSpeed's mixed precision follows it.
    dtype = method.quantization.compute_dtype if method.sharded_qlora else spec.model.dtype
    optimization: dict = {
        "stage": zero.stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    if zero.offload_optimizer:
        optimization["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.resources.gpus_per_worker > 0}
    if zero.offload_params:
        optimization["offload_param"] = {"device": "cpu", "pin_memory": spec.resources.gpus_per_worker > 0}
    if method.sharded_qlora:
        threshold = _qlora_persistence_threshold(spec)
        if threshold is not None:
            optimization["stage3_param_persistence_threshold"] = threshold
    elif zero.stage == 3:
        # Lets rank 0 write a consolidated 16-bit state dict for export without zero_to_fp32.
        optimization["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": training.global_batch_size,
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accumulation,
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": optimization,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": training.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
                       "weight_decay": training.weight_decay},
        },
        "steps_per_print": 10**9,  # tunerun reports progress itself
        "wall_clock_breakdown": False,
    }


def _qlora_persistence_threshold(spec: JobSpec) -> int | None:
    """Below this many elements a ZeRO-3 parameter stays whole on every rank. Hugging Face's "auto" value is
    10 × hidden_size (norms and biases stay whole, every matrix is partitioned); a packed 4-bit weight holds four
    weights per 16-bit element, so QLoRA uses a quarter of it. None (DeepSpeed's default) for a model whose
    config.json is not on this machine."""
    config = Path(spec.model.path) / "config.json"
    try:
        hidden = json.loads(config.read_text(encoding="utf-8")).get("hidden_size")
    except (OSError, ValueError):
        return None
    return 10 * hidden // 4 if isinstance(hidden, int) and hidden > 0 else None

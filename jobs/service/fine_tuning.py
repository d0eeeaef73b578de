"""Fine-tuning jobs: a job *is* a tunerun run, made from a catalog model's job spec and the request.

The run folder holds everything (job.yaml, run.json, events, metrics, checkpoints, the export) plus
``service.json``: the project, the request as it came, the suffix and the id of the job's result file. It is
written once, before the run exists, so every run with a run.json that belongs to the service has one. The
server keeps nothing else: a restarted server, or a second one on the same storage, sees every job. What it has
read of them it keeps in a `JobIndex` (`tunerun.jobs.service.index`), shared by the handlers and the scheduler.

A request's ``method`` picks the template's objective: ``supervised`` trains ``sft`` on conversations, ``dpo``
trains ``dpo`` on preference pairs (OpenAI's method types; `METHODS`). The training and validation files must hold
the records that objective reads, which their file objects record at upload, so a mismatch is refused at creation.

With the local target, jobs beyond ``max_concurrent_runs`` wait as ``queued`` (`tunerun.jobs.service.scheduler`
starts them as slots free, fairly across projects, detached, so they keep training while the server is down);
other targets are given the job at once, placed where its project's jobs go, and queue it in the cluster's own
scheduler. A project may hold at most its ``max_queued`` jobs waiting (429 beyond).
"""
from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunerun.cluster import targets
from tunerun.cluster.run_folder import ADAPTER_CONFIG, SERVICE_RECORD, RunFolder, RunStore, final_weights, read_job
from tunerun.cluster.runs import RunInfo, RunState, create_run, read_info, record_cancelled
from tunerun.jobs.errors import SpecError, TunerunError
from tunerun.jobs.loader import load_job_text
from tunerun.jobs.plan import ResolvedJob, resolve
from tunerun.jobs.service.config import Served
from tunerun.jobs.service.errors import ApiError, bad_request, not_found, tenant_text
from tunerun.jobs.service.files import FileObject, FileStore
from tunerun.jobs.service.index import FINISHED, JobIndex
from tunerun.jobs.spec import JobSpec
from tunerun.trainer.data.formats import PREFERENCE_FORMATS
from tunerun.trainer.objectives import OBJECTIVES

logger = logging.getLogger("tunerun.serve")
JOB_ID = re.compile(r"ftjob-[0-9a-f]{24}")
CHECKPOINT_MODEL = re.compile(r"(?P<model>ft:.+:(?P<job>ftjob-[0-9a-f]{24})):ckpt-step-(?P<step>[0-9]{1,9})")
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")
INTEGRATIONS = ("mlflow",)  # tracking tunerun feeds itself (tracking.mlflow in the job spec)
MAX_PAIRS, MAX_KEY, MAX_VALUE = 16, 64, 512  # OpenAI's bounds for metadata; tags take the same
METHODS = {"supervised": "sft", "dpo": "dpo"}  # OpenAI's method.type → the training.objective it runs
# Where a spec problem shows in the request: the field the request filled in. Hyperparameters are named where the
# request gives them (`JobRequest.hyperparameters_at`): `HYPERPARAMETERS` names them there.
PARAMS = {"training.seed": "seed", "data.train": "training_file", "data.eval": "validation_file",
          "training.objective": "method.type",
          **{f"tracking.mlflow.{name}": "integrations" for name in ("experiment", "run_name", "tags")}}
OPENAI_PAIR = '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}'
WAITING = (RunState.QUEUED, RunState.PENDING)  # a job not started yet: queued here, or pending in the cluster
HYPERPARAMETERS = {"training.epochs": "n_epochs", "training.global_batch_size": "batch_size",
                   "training.learning_rate": "learning_rate_multiplier", "training.dpo.beta": "beta"}


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | str = "auto"
    batch_size: int | str = "auto"
    learning_rate_multiplier: float | str = "auto"

    @field_validator("n_epochs", "batch_size", "learning_rate_multiplier", mode="before")
    @classmethod
    def _auto_or_positive(cls, value, info):
        return auto_or_positive(value, info.field_name, whole=info.field_name != "learning_rate_multiplier")


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones and ``beta`` (training.dpo.beta; its upper bound is the
    spec's, and a beta it refuses is named here by the spec's problem mapped back, `HYPERPARAMETERS`)."""

    beta: float | str = "auto"

    @field_validator("beta", mode="before")
    @classmethod
    def _beta_auto_or_positive(cls, value, info):
        return auto_or_positive(value, info.field_name, whole=False)


def auto_or_positive(value, name: str, whole: bool):
    """A hyperparameter's value as OpenAI takes it: "auto", or a number above 0 (a whole one when ``whole``)."""
    if value == "auto":
        return value
    # bool is an int to Python (true would train 1 epoch); inf/nan are floats JSON can carry (1e999)
    if isinstance(value, (str, bool)) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be 'auto' or a number above 0 (got {value!r})")
    if whole and not float(value).is_integer():
        raise ValueError(f"{name} must be 'auto' or a whole number (got {value!r})")
    return value


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Hyperparameters()


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class MethodRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other methods' blocks (reinforcement) are refused by type, by name
    type: str
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class MlflowIntegration(BaseModel):
    """Where the job's MLflow run goes on the platform's tracking server (the catalog model's spec names the
    server: a request never points training at an address of its own)."""

    model_config = ConfigDict(extra="forbid")
    experiment: str | None = Field(None, min_length=1, max_length=500)
    run_name: str | None = Field(None, min_length=1, max_length=250)
    tags: dict[str, str] | None = None

    @field_validator("tags")
    @classmethod
    def _few_tags(cls, tags: dict | None) -> dict | None:
        _check_pairs(tags, "tags")
        return tags


class Integration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    mlflow: MlflowIntegration | None = None

    @field_validator("type")
    @classmethod
    def _supported(cls, kind: str) -> str:
        if kind not in INTEGRATIONS:
            raise ValueError(f"integration type {kind[:40]!r} is not available here; this server supports: "
                             f"{', '.join(INTEGRATIONS)}")
        return kind


def _check_pairs(pairs: dict | None, what: str) -> None:
    if pairs and (len(pairs) > MAX_PAIRS or any(len(k) > MAX_KEY or len(v) > MAX_VALUE for k, v in pairs.items())):
        raise ValueError(f"{what} holds at most {MAX_PAIRS} pairs, keys up to {MAX_KEY} and values up to "
                         f"{MAX_VALUE} characters")


class JobRequest(BaseModel):
    """The body of ``POST /v1/fine_tuning/jobs``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=200)
    training_file: str = Field(max_length=100)
    validation_file: str | None = Field(None, max_length=100)
    hyperparameters: Hyperparameters | None = None
    method: MethodRequest | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Integration] | None = Field(None, max_length=len(INTEGRATIONS))

    @field_validator("suffix")
    @classmethod
    def _plain_suffix(cls, suffix: str | None) -> str | None:
        if suffix is not None and not SUFFIX.fullmatch(suffix):
            raise ValueError("suffix must be 1 to 64 letters, digits, '-' or '_' (it becomes part of the model name)")
        return suffix

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, metadata: dict | None) -> dict | None:
        _check_pairs(metadata, "metadata")
        return metadata

    @field_validator("integrations")
    @classmethod
    def _one_of_each(cls, integrations: list | None) -> list | None:
        kinds = [i.type for i in integrations or []]
        if len(set(kinds)) < len(kinds):
            raise ValueError("name each integration type once")
        for integration in integrations or []:
            if getattr(integration, integration.type) is None:
                raise ValueError(f"an integration of type {integration.type!r} needs its settings under "
                                 f"{integration.type!r}, e.g. {{\"type\": \"mlflow\", \"mlflow\": {{\"experiment\": "
                                 "\"support\"}}")
        return integrations

    @property
    def method_type(self) -> str:
        return self.method.type if self.method is not None else "supervised"  # OpenAI's default

    def hyperparameters_at(self) -> str:
        """Where the request's hyperparameters are: under its method, or at the top level (deprecated, supervised
        only) when a supervised request gives no method block."""
        if self.method_type == "supervised" and (self.method is None or self.method.supervised is None):
            return "hyperparameters"
        return f"method.{self.method_type}.hyperparameters"

    def chosen_hyperparameters(self) -> Hyperparameters:
        """The hyperparameters asked for (`DpoHyperparameters` for dpo); 400 for a method not served here, a
        method block beside another type, or hyperparameters given in two places."""
        if self.method is None:
            return self.hyperparameters or Hyperparameters()
        kind = self.method.type
        if kind not in METHODS:
            raise bad_request(f"method type {kind[:40]!r} is not available here; tunerun fine-tunes with "
                              f"{' or '.join(repr(m) for m in METHODS)}", "method.type", "unsupported_method")
        given = [name for name in METHODS if getattr(self.method, name) is not None]  # a field per method served
        stray = [name[:40] for name in given + list(self.method.model_extra or {}) if name != kind]
        if stray:
            raise bad_request(f"method.type is {kind!r}: its settings go under method.{kind}, not method.{stray[0]}",
                              f"method.{stray[0]}")
        block = getattr(self.method, kind)
        if kind == "dpo" and self.hyperparameters is not None:  # OpenAI's top-level field is supervised's only
            raise bad_request("hyperparameters at the top level apply to supervised jobs (and are deprecated); give "
                              "a dpo job's under method.dpo.hyperparameters", "hyperparameters")
        if block is not None and self.hyperparameters is not None:  # which one would win is a guess: OpenAI refuses
            raise bad_request("give hyperparameters either at the top level (deprecated) or under "
                              "method.supervised.hyperparameters, not both", "hyperparameters")
        if block is not None:
            return block.hyperparameters
        return DpoHyperparameters() if kind == "dpo" else self.hyperparameters or Hyperparameters()


@dataclass(frozen=True)
class ServiceRecord:
    """``service.json``: who asked for the run, and how."""

    job_id: str
    project: str
    model: str
    created_at: float
    request: dict
    result_file: str
    hyperparameters: dict  # n_epochs, batch_size, learning_rate_multiplier as the job trains
    seed: int  # the seed the job trains with (the request's, else the spec's)
    method: str = "supervised"  # OpenAI's method.type (records written before dpo was served have none)
    beta: float | None = None  # dpo: the training.dpo.beta the job trains with

    @property
    def suffix(self) -> str | None:
        return self.request.get("suffix")

    @property
    def metadata(self) -> dict:
        return self.request.get("metadata") or {}


def fine_tuned_model(record: ServiceRecord) -> str:
    """OpenAI's naming: ``ft:<base model>:<project>:<suffix>:<job id>``."""
    return f"ft:{record.model}:{record.project}:{record.suffix or ''}:{record.job_id}"


def checkpoint_model(record: ServiceRecord, step: int) -> str:
    """OpenAI's name of a job's checkpoint (``fine_tuned_model_checkpoint``): the model's, then ``:ckpt-step-N``;
    `CHECKPOINT_MODEL` reads it back."""
    return f"{fine_tuned_model(record)}:ckpt-step-{step}"


def method_overrides(template: JobSpec, method: str, hyper: Hyperparameters) -> list[str]:
    """The ``--set`` items that turn the catalog template into a job of ``method`` (`METHODS`)."""
    objective, overrides = METHODS[method], []
    if template.training.objective != objective:
        overrides.append(f"training.objective={objective}")
        if objective != "dpo" and template.training.dpo is not None:
            overrides.append("training.dpo=null")  # the block belongs to objective dpo; the spec refuses it elsewhere
    if objective == "dpo":
        if hyper.beta != "auto":  # else the template's beta, or DPOSpec's default
            overrides.append(f"training.dpo.beta={float(hyper.beta)!r}")
        # A template written for supervised jobs may pack them (packing only saves padding there). A preference
        # pair's two answers are compared with each other and cannot share a row with other pairs, so a dpo job on
        # that template trains unpacked instead of being refused for the admin's choice.
        if template.data.packing:
            overrides.append("data.packing=false")
    # A template may fix data.format for the records its admin had in mind; the request's file was read at upload,
    # and its format checked against the method, so a format of the other kind gives way to detection.
    if template.data.format != "auto" and template.data.format not in OBJECTIVES[objective].formats:
        overrides.append("data.format=auto")
    return overrides


class JobFolders(RunStore):
    """The storage's run folders as the service lists them: `run_ids` names the folders that may be jobs, from one
    listing request (not a run.json lookup per folder: the index reads a new job's record and run.json once)."""

    def run_ids(self) -> list[str]:
        return [name for name in self.backend.children("") if JOB_ID.fullmatch(name)]


class JobService:
    def __init__(self, served: Served, files: FileStore):
        self.served, self.config, self.files = served, served.config, files
        self.store = JobFolders(self.config.storage)
        self.index = JobIndex(self.config.storage, lambda: self.store.run_ids(), lambda data: ServiceRecord(**data))
        self._targets: dict[str, targets.Target] = {}
        self._lock = threading.Lock()
        self._admitting: dict[str, threading.Lock] = {}

    # ── creating ────────────────────────────────────────────────────────────────────────────────────────────

    def create(self, project: str, request: JobRequest) -> RunFolder:
        with self._lock:
            admitting = self._admitting.setdefault(project, threading.Lock())
        with admitting:  # this server's creates of one project pass the queue check one at a time
            return self._create(project, request)

    def _create(self, project: str, request: JobRequest) -> RunFolder:
        self._check_queue(project)
        base, start = self._starting_point(project, request.model)
        hyper, at = request.chosen_hyperparameters(), request.hyperparameters_at()
        self._check_hyperparameters(base, hyper, at)
        train = self._usable_file(project, request.training_file, "training_file", request.method_type)
        data = {"train": self.files.data_uri(project, train.id),
                "eval": self.files.data_uri(project, self._usable_file(project, request.validation_file,
                                                                       "validation_file", request.method_type).id)
                if request.validation_file else None}
        job_id = f"ftjob-{secrets.token_hex(12)}"
        job = self._resolved_job(job_id, request, base, hyper, data, start, project)
        self._check_budget(job, train, hyper, at)
        run = RunFolder(self.config.storage, job_id)
        template = self.served.templates[base].training
        record = ServiceRecord(job_id=job_id, project=project, model=base, created_at=time.time(),
                               request=request.model_dump(mode="json", exclude_none=True),
                               result_file=f"file-{secrets.token_hex(12)}",
                               hyperparameters={"n_epochs": job.spec.training.epochs,
                                                "batch_size": job.spec.training.global_batch_size,
                                                "learning_rate_multiplier": job.spec.training.learning_rate
                                                / template.learning_rate},
                               seed=job.spec.training.seed, method=request.method_type,
                               beta=job.spec.training.dpo.beta if job.spec.training.dpo else None)
        run.write_json(SERVICE_RECORD, vars(record))  # before run.json: a listed run always has its record
        if self.config.target == "local":
            create_run(job, "local", state=RunState.QUEUED)
        else:
            targets.get(self.config.target).submit(job)
        self.index.add(run, record)
        return run

    def _check_queue(self, project: str) -> None:
        """429 when the project already has its ``max_queued`` jobs waiting (queued here, or pending in the
        cluster's queue): one team's backlog has a bound the platform team chose."""
        limit = self.config.project(project).max_queued
        if limit is None:
            return
        waiting = sum(1 for run, _ in self.index.jobs_of(project) if self.known_state(run) in WAITING)
        if waiting >= limit:
            raise ApiError(429, f"Project {project} already has {waiting} jobs waiting to start, its limit "
                                f"(max_queued: {limit}); create this job once one of them has started or been "
                                "cancelled", None, "rate_limit_exceeded", type_="requests")

    def _check_model_allowed(self, project: str, model: str) -> None:
        allowed = self.config.models_of(project)
        if model not in allowed:
            raise ApiError(404, f"The model {model!r} is not available to project {project}; it may fine-tune: "
                                f"{', '.join(allowed) or 'no model'}", "model", "model_not_found")

    def _starting_point(self, project: str, model: str) -> tuple[str, list[str]]:
        """(catalog model, --set items): a catalog model as it is, or a fine-tuned model of this project (OpenAI's
        ``ft:`` name, e.g. supervised first, then dpo on it), whose job's weights the new job starts from — its
        adapter as model.adapter on the weights that adapter was trained on (the catalog model's, or a full
        fine-tune's further up), or a full fine-tune's model as model.path — on the catalog model's spec."""
        if model in self.served.templates:
            self._check_model_allowed(project, model)
            return model, []
        run, record = self.fine_tuned(project, model) or (None, None)
        if record is None or record.model not in self.served.templates:
            raise ApiError(404, f"The model {model!r} is not in this server's catalog or among your fine-tuned "
                                f"models; catalog: {', '.join(self.served.templates)}", "model", "model_not_found")
        self._check_model_allowed(project, record.model)  # its catalog model may have been taken from the project
        state = self.known_state(run)
        if state != RunState.SUCCEEDED:
            raise bad_request(f"{model} cannot be trained on yet: its fine-tuning job is {state.value}; start from "
                              "it once it has succeeded", "model", "model_not_ready")
        adapter, full = final_weights("adapter"), final_weights("model")
        if run.exists(f"{adapter}/{ADAPTER_CONFIG}"):
            # An adapter only means something on the base it was trained on: a LoRA trained on a full fine-tune
            # continues on that fine-tune's weights, not on the catalog model's.
            trained_on = read_job(run).spec.model.path
            return record.model, [f"model.adapter={json.dumps(run.uri(adapter))}",
                                  f"model.path={json.dumps(trained_on)}"]
        return record.model, [f"model.path={json.dumps(run.uri(full))}"]

    def _usable_file(self, project: str, file_id: str, param: str, method: str) -> FileObject:
        try:
            found = self.files.get(project, file_id)
        except ApiError:
            raise not_found("file", file_id, param) from None
        if found.status == "uploaded":
            raise bad_request(f"File {file_id} is still being validated; create the job once files.retrieve says "
                              "'processed'", param, "file_not_ready")
        if found.status == "error":
            raise bad_request(f"File {file_id} failed validation: {found.status_details}", param, "invalid_file")
        reads = OBJECTIVES[METHODS[method]].formats
        if found.format is not None and found.format not in reads:  # None: stored before formats were recorded
            pairs = found.format in PREFERENCE_FORMATS
            raise bad_request(f"File {file_id} holds {found.format} records"
                              + (" (preference pairs), which train with method {\"type\": \"dpo\"}" if pairs else "")
                              + f"; method {method} trains on {', '.join(reads)} records"
                              + (f" (OpenAI's: {OPENAI_PAIR})" if method == "dpo" else ""), param, "invalid_file")
        return found

    def _check_hyperparameters(self, model: str, hyper: Hyperparameters, at: str) -> None:
        """What the catalog and this server's limits allow, checked on the values the request sent (the job spec
        would name the derived ones: a learning rate, not the multiplier). ``at``: where the request gave them."""
        limits = self.config.limits
        if hyper.n_epochs != "auto" and hyper.n_epochs > limits.max_epochs:
            raise bad_request(f"{at}.n_epochs: at most {limits.max_epochs} on this server (got "
                              f"{hyper.n_epochs:g})", f"{at}.n_epochs")
        base = self.served.templates[model].training.learning_rate
        if hyper.learning_rate_multiplier != "auto" and hyper.learning_rate_multiplier * base >= 1:
            raise bad_request(f"{at}.learning_rate_multiplier: must be below {1 / base:g} for model "
                              f"{model} (got {hyper.learning_rate_multiplier:g})", f"{at}.learning_rate_multiplier")

    def _check_budget(self, job: ResolvedJob, train: FileObject, hyper: Hyperparameters, at: str) -> None:
        """A batch the training file can fill, and no more optimizer steps than this server allows a job."""
        training, data = job.spec.training, job.spec.data
        records = (train.cleaning or {}).get("kept", train.records) or 0
        examples = records if data.eval else records - math.ceil(records * data.eval_fraction)
        if training.global_batch_size > examples:
            raise bad_request(f"{at}.batch_size: {training.global_batch_size:,} is more than the "
                              f"{examples:,} training examples of {train.id}; use a batch of at most {examples:,}",
                              f"{at}.batch_size")
        steps = training.max_steps or math.ceil(examples / training.global_batch_size) * training.epochs
        if steps > self.config.limits.max_steps:
            param = f"{at}.n_epochs" if hyper.n_epochs != "auto" else f"{at}.batch_size"
            raise bad_request(f"{param}: this job would train {steps:,} steps; this server allows at most "
                              f"{self.config.limits.max_steps:,} per job (fewer epochs or a larger batch)", param)

    def _resolved_job(self, job_id: str, request: JobRequest, model: str, hyper: Hyperparameters, data: dict,
                      start: list[str], project: str) -> ResolvedJob:
        """The catalog ``model``'s spec with the request's settings, starting from ``start`` (`_starting_point`),
        placed where the project's jobs go (`ServerConfig.targets_for`)."""
        template = self.served.templates[model]
        overrides = [*start, f"data.train={json.dumps(data['train'])}"]
        if data["eval"]:
            overrides.append(f"data.eval={json.dumps(data['eval'])}")
        if hyper.n_epochs != "auto":
            overrides += [f"training.epochs={int(hyper.n_epochs)}", "training.max_steps=null"]
        if hyper.batch_size != "auto":
            overrides.append(f"training.global_batch_size={int(hyper.batch_size)}")
        if hyper.learning_rate_multiplier != "auto":
            rate = template.training.learning_rate * float(hyper.learning_rate_multiplier)
            overrides.append(f"training.learning_rate={rate!r}")
        if request.seed is not None:
            overrides.append(f"training.seed={request.seed}")
        overrides += method_overrides(template, request.method_type, hyper)
        overrides += self._integration_overrides(request, model)
        try:
            spec = load_job_text(self.served.texts[model], f"model {model}", overrides,
                                 model=targets.job_model())
            update = {"storage": self.config.storage, "targets": self.config.targets_for(project)}
            spec = spec.model_copy(update=update)
            return resolve(spec, run_id=job_id, source=f"model {model}")
        except SpecError as exc:
            first = exc.problems[0]
            param = (f"{request.hyperparameters_at()}.{HYPERPARAMETERS[first.path]}" if first.path in HYPERPARAMETERS
                     else PARAMS.get(first.path, first.path))
            message = first.message.replace(" (from --set)", "")
            raise bad_request(f"{param}: {message}", param) from None
        except TunerunError as exc:
            logger.warning("job request for model %s refused: %s", model, exc)  # the admin's view, whole
            raise bad_request(f"model {model} cannot train this request: {tenant_text(str(exc))}") from None

    def _integration_overrides(self, request: JobRequest, model: str) -> list[str]:
        wanted = next((i.mlflow for i in request.integrations or [] if i.type == "mlflow"), None)
        if wanted is None:
            return []
        if self.served.templates[model].tracking.mlflow is None:
            raise bad_request(f"model {model} has no MLflow tracking server on this server; ask your "
                              "platform team to set tracking.mlflow in its job spec", "integrations")
        chosen = wanted.model_dump(exclude_none=True)
        return [f"tracking.mlflow.{name}={json.dumps(value)}" for name, value in chosen.items()]

    # ── reading ─────────────────────────────────────────────────────────────────────────────────────────────

    def record(self, run: RunFolder) -> ServiceRecord | None:
        found = self.index.find(run.run_id)
        return found[1] if found else None

    def fine_tuned(self, project: str, model: str) -> tuple[RunFolder, ServiceRecord] | None:
        """The job whose ``fine_tuned_model`` is ``model`` (an ``ft:`` name), if ``project`` owns it; None otherwise,
        whatever the job's state (callers say what a job not yet succeeded means for them)."""
        job_id = model.rsplit(":", 1)[-1] if model.startswith("ft:") else ""
        try:
            run, record = self.owned(project, job_id)
        except ApiError:
            return None
        return (run, record) if fine_tuned_model(record) == model else None  # not a name that only ends in the id

    def owned(self, project: str, job_id: str) -> tuple[RunFolder, ServiceRecord]:
        """The run of ``job_id`` if ``project`` owns it; 404 otherwise (also for another project's job)."""
        found = self.index.find(job_id) if JOB_ID.fullmatch(job_id or "") else None
        if found is None or found[1].project != project:
            raise not_found("job", job_id, "fine_tuning_job_id")
        return found

    def jobs_of(self, project: str) -> list[tuple[RunFolder, ServiceRecord]]:
        """The project's jobs, newest first."""
        return self.index.jobs_of(project)

    def result_of(self, project: str, file_id: str) -> tuple[RunFolder, ServiceRecord] | None:
        """The project's job whose result file is ``file_id``."""
        return self.index.by_result_file(project, file_id)

    def status(self, run: RunFolder) -> RunInfo:
        """run.json as the run's target sees it, read now; a finished run's target is not asked (it cannot
        change what the driver recorded). The index learns whether the run has finished."""
        info = read_info(run)
        info = self._target(info.target, run).status(run, info, ask_finished=False)
        self.index.note(run.run_id, info)
        return info

    def known_state(self, run: RunFolder) -> RunState:
        """The state run.json records, read only when the index does not know the run finished (the target is not
        asked: a list of models needs no more)."""
        finished = self.index.finished(run.run_id)
        if finished:
            return finished.state
        info = read_info(run)
        if info.state in FINISHED:  # what status would say too: a finished run's target is not asked
            self.index.note(run.run_id, info)
        return info.state

    def target_of(self, run: RunFolder):
        return targets.for_run(run)

    def _target(self, name: str, run: RunFolder) -> targets.Target:
        """One instance per target for reading states."""
        with self._lock:
            if name not in self._targets:
                self._targets[name] = targets.for_run(run)  # a name this tunerun does not know: its TargetError
            return self._targets[name]

    # ── acting ──────────────────────────────────────────────────────────────────────────────────────────────

    def cancel(self, run: RunFolder) -> None:
        info = read_info(run)
        if info.state == RunState.QUEUED:
            record_cancelled(run, info.target)
        elif not info.state.terminal:
            self.target_of(run).cancel(run, warn=lambda message: logger.warning("job %s: %s", run.run_id, message))
        # cancelling a finished job changes nothing; the job object says how it ended

    def pause(self, run: RunFolder) -> None:
        target = self.target_of(run)
        if not target.pause(run):  # it pauses only a running run
            raise bad_request(f"Job {run.run_id} is {target.status(run).state}: only a running job can be paused",
                              "fine_tuning_job_id", "invalid_state")

    def resume(self, run: RunFolder) -> None:
        state = self.target_of(run).status(run).state
        if state != RunState.PREEMPTED:
            raise bad_request(f"Job {run.run_id} is {state}: only a paused job can be resumed", "fine_tuning_job_id",
                              "invalid_state")
        job = read_job(run, to_run=True)
        if self.config.target == "local":
            create_run(job, "local", resume=True, state=RunState.QUEUED)
        else:
            targets.get(self.config.target).submit(job, resume=True)

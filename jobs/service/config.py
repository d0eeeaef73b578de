"""``server.yaml``: what `tunerun serve` serves, checked like a job spec (every problem at once, with its line).

```yaml
storage: {uri: s3://training/tunerun, endpoint_url: http://minio:9000}   # runs, uploads and keys live here
target: local                 # local | ray | slurm | k8s, with the targets.* blocks of a job spec
max_concurrent_runs: 1        # local target: more jobs wait as `queued`, served fairly across projects; other
                              # targets queue in the cluster
models:                       # what users may fine-tune: a name → the job spec the platform team wrote
  support-tiny: {job: specs/quickstart.yaml}
uploads: {max_file_bytes: 1073741824}
limits: {max_request_bytes: 65536, max_epochs: 50, max_steps: 100000}   # per request / per job (defaults shown)
sessions: {hours: 8}          # how long a dashboard sign-in lasts
inference:                    # chat/completions on the catalog models and their fine-tunes (engines.py)
  engines:
    support-tiny: {managed: {python: .venv-vllm/bin/python, max_loras: 4, max_model_len: 512}}
  full_fine_tunes: {max_engines: 1, idle_stop_s: 600}   # each its own engine, started on demand (full_engines.py;
                              # on Kubernetes a Deployment: kubernetes: {gpus, memory, …}, k8s_engines.py)
  max_n: 4                    # choices per request
projects:                     # per team: limits, models and placement (a project not listed: the server's)
  acme: {max_concurrent_runs: 2, max_queued: 20, models: [support-tiny],
         kubernetes: {namespace: acme, queue: acme-queue}, slurm: {account: acme, qos: normal, partition: gpu}}
webhooks:                     # OpenAI's job events, signed, to the endpoints the admin allows (webhooks.py)
  allow: [https://hooks.example.com]
  endpoints: {acme: [{url: https://hooks.example.com/acme, secret_env: ACME_WEBHOOK_SECRET}]}
host: 127.0.0.1
port: 8000
```

Relative paths (``models.*.job`` and the paths inside those specs) are relative to the directory `tunerun serve`
runs in, as for every tunerun command. A request fills in only the data, the hyperparameters, the seed, a suffix
and metadata; everything else is the template's.
"""
from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunerun.cluster import targets
from tunerun.cluster.k8s import KubeRaySettings
from tunerun.cluster.slurm import slurm_word
from tunerun.jobs.errors import Problem, SpecError
from tunerun.jobs.loader import load_config, load_job_text, read_spec_text
from tunerun.jobs.service.engines import EngineEntry
from tunerun.jobs.service.full_engines import FullFineTuneSettings
from tunerun.jobs.service.k8s_engines import FullFineTunesOnKubernetes
from tunerun.jobs.service.keys import project_name_problem
from tunerun.jobs.service.webhooks import WebhookSettings
from tunerun.jobs.spec import JobSpec, StorageSpec, Strict, field_error

TARGETS = targets.names()
TargetsSettings = targets.settings_model()  # each target's block, declared by the target module
UPLOAD_PLACEHOLDER = "uploaded-training-file.jsonl"  # stands in for data.train while a template is checked
GIB = 1 << 30


class ModelEntry(Strict):
    job: str = Field(description="The job spec this model is fine-tuned with.")
    description: str | None = None


class UploadLimits(Strict):
    max_file_bytes: int = Field(GIB, ge=1)


class JobLimits(Strict):
    """What one request may ask of the server: a body is read only up to ``max_request_bytes`` (a job request is a
    few KB), and a job may not train beyond ``max_epochs`` (OpenAI allows 1–50) or ``max_steps`` optimizer steps."""

    max_request_bytes: int = Field(64 * 1024, ge=4096, le=16 << 20)
    max_epochs: int = Field(50, ge=1, le=10_000)
    max_steps: int = Field(100_000, ge=1)


class SessionLimits(Strict):
    hours: float = Field(8.0, gt=0, le=24 * 30, description="How long a dashboard sign-in lasts.")


class FullFineTunes(FullFineTuneSettings):
    """``inference.full_fine_tunes``; on Kubernetes (``kubernetes``, written by `tunerun serve render`) each engine is
    a Deployment the server creates rather than a process (`tunerun.jobs.service.k8s_engines`)."""

    kubernetes: FullFineTunesOnKubernetes | None = Field(None, description="Engines as Kubernetes objects.")


class InferenceSettings(Strict):
    """Serving the catalog models and their fine-tunes: which engine serves each base, and what a request may ask."""

    engines: dict[str, EngineEntry] = Field({}, description="Catalog model → the vLLM engine serving it.")
    full_fine_tunes: FullFineTunes | None = Field(None, description="Full fine-tunes' own engines, started "
                                                         "on demand; unset: full fine-tunes are not served.")
    max_n: int = Field(4, ge=1, le=128, description="Choices one request may ask for.")
    max_request_bytes: int = Field(1 << 20, ge=4096, le=64 << 20, description="A chat history's size limit.")


class ProjectKubernetes(Strict):
    """Where a project's jobs go on the k8s target (`targets.k8s.namespace` and `.queue` for its jobs)."""

    namespace: str | None = Field(None, description="Default: the project's name.")
    queue: str | None = Field(None, description="Kueue LocalQueue in the namespace; the cluster's quota decides.")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        return None if v is None else KubeRaySettings.dns_label(v)

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str | None) -> str | None:
        return None if v is None else KubeRaySettings.queue_name(v)


class ProjectSlurm(Strict):
    """Where a project's jobs go on the slurm target (`targets.slurm.account/qos/partition` for its jobs)."""

    account: str | None = None
    qos: str | None = None
    partition: str | None = None

    @field_validator("account", "qos", "partition")
    @classmethod
    def _slurm_word(cls, v: str | None) -> str | None:
        return slurm_word(v)


# A project's placement block → the target whose settings it overrides for the project's jobs.
PLACEMENT = {"kubernetes": "k8s", "slurm": "slurm"}


class ProjectSettings(Strict):
    """One team's share of the server: how many of its jobs run and wait at once, which catalog models it may
    train, and where its jobs go. Unset limits are the server's (a project not listed has no limits of its own)."""

    max_concurrent_runs: int | None = Field(None, ge=1, description="Its jobs running at once (at most the server's).")
    max_queued: int | None = Field(None, ge=0, description="Its jobs waiting at once; one more is refused (429).")
    models: list[str] | None = Field(None, description="The catalog models it may train; unset: all of them.")
    kubernetes: ProjectKubernetes | None = None
    slurm: ProjectSlurm | None = None


class ServerConfig(Strict):
    storage: StorageSpec = StorageSpec()
    target: Literal[TARGETS] = "local"
    targets: TargetsSettings = TargetsSettings()
    max_concurrent_runs: int = Field(1, ge=1)
    models: dict[str, ModelEntry]
    uploads: UploadLimits = UploadLimits()
    limits: JobLimits = JobLimits()
    sessions: SessionLimits = SessionLimits()
    inference: InferenceSettings = InferenceSettings()
    webhooks: WebhookSettings = WebhookSettings()
    projects: dict[str, ProjectSettings] = Field({}, description="Per-project limits, models and placement.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @field_validator("models")
    @classmethod
    def _some_models(cls, models: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        if not models:
            raise ValueError("name at least one model users may fine-tune, e.g. {support-8b: {job: "
                             "specs/qlora-8b.yaml}}")
        for name in models:
            if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"model name {name!r}: use up to 64 letters, digits, '-', '_' or '.'")
        return models

    @model_validator(mode="after")
    def _engines_serve_catalog_models(self):
        for name in self.inference.engines:
            if name not in self.models:
                raise self._not_in_catalog(f"inference.engines.{name}", name)
        full = self.inference.full_fine_tunes
        for name in full.kubernetes.models if full and full.kubernetes else ():
            if name not in self.models:
                raise self._not_in_catalog(f"inference.full_fine_tunes.kubernetes.models.{name}", name)
        return self

    def _not_in_catalog(self, field: str, name: str):
        close = difflib.get_close_matches(name, self.models, n=1)
        return field_error(field, f"'{name}' is not a model under models:" + (
            f" — did you mean '{close[0]}'?" if close else f" (they are {', '.join(self.models)})"))

    @model_validator(mode="after")
    def _projects_fit(self):
        for name, project in self.projects.items():
            problem = project_name_problem(name)
            if problem:
                raise field_error(f"projects.{name}", f"{problem}, as `tunerun serve keys create` takes")
            for model in project.models or []:
                if model not in self.models:
                    raise self._not_in_catalog(f"projects.{name}.models", model)
            if project.kubernetes and project.kubernetes.namespace is None:
                try:  # the project's name becomes its namespace
                    KubeRaySettings.dns_label(name)
                except ValueError:
                    raise field_error(f"projects.{name}.kubernetes.namespace", f"project {name!r} cannot name a "
                                      "namespace (it must end with a letter or digit): set namespace") from None
        return self

    def project(self, name: str) -> ProjectSettings:
        """The project's settings; a project not listed has the server's (`ProjectSettings` unset)."""
        return self.projects.get(name) or ProjectSettings()

    def models_of(self, name: str) -> list[str]:
        """The catalog models project ``name`` may fine-tune and call: its ``models``, else every one."""
        allowed = self.project(name).models
        return [model for model in self.models if allowed is None or model in allowed]

    def max_concurrent_runs_of(self, name: str) -> int:
        return min(self.project(name).max_concurrent_runs or self.max_concurrent_runs, self.max_concurrent_runs)

    def targets_for(self, name: str) -> dict:
        """The spec's ``targets:`` block for the project's jobs: the server's, with the project's placement."""
        placed, project = self.targets.model_dump(), self.project(name)
        for block, target in PLACEMENT.items():
            settings = getattr(project, block)
            if settings is not None:
                placed[target] = {**placed[target], **settings.model_dump(exclude_none=True)}
        if project.kubernetes is not None:
            placed["k8s"]["namespace"] = project.kubernetes.namespace or name
        return placed


class Served:
    """The checked configuration and, for each catalog model, its job spec template: validated, and its text as
    read at startup (a request's job is that text with the request's fields set, checked again)."""

    def __init__(self, config: ServerConfig, templates: dict[str, JobSpec], texts: dict[str, str], source: Path):
        self.config, self.templates, self.texts, self.source = config, templates, texts, source
        self.loaded_at = time.time()  # the catalog's models are as old as the configuration that names them


def load_server_config(path: str | Path) -> Served:
    """server.yaml and every model's job spec, each checked; `SpecError` with every problem of every file."""
    path = Path(path).expanduser().absolute()
    config = load_config(path, ServerConfig)
    templates, texts, problems = {}, {}, []
    for name, entry in config.models.items():
        try:
            texts[name] = read_spec_text(entry.job)
            templates[name] = load_job_text(texts[name], entry.job, [f"data.train={UPLOAD_PLACEHOLDER}"],
                                            model=targets.job_model())
        except SpecError as exc:
            problems += [Problem(f"models.{name}.job", f"{exc.source}: {p.path or '(top level)'}"
                                 + (f" (line {p.line})" if p.line else "") + f": {p.message}")
                         for p in exc.problems]
    if problems:
        raise SpecError(str(path), problems)
    return Served(config, templates, texts, path)

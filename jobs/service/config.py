"""``server.yaml``: what `tunerun serve` serves, checked like a job spec (every problem at once, with its line).

```yaml
storage: {uri: s3://training/tunerun, endpoint_url: http://minio:9000}   # runs, uploads and keys live here
target: local                 # local | ray | slurm | k8s, with the targets.* blocks of a job spec
max_concurrent_runs: 1        # local target: more jobs wait as `queued`; other targets queue in the cluster
models:                       # what users may fine-tune: a name → the job spec the platform team wrote
  support-tiny: {job: specs/quickstart.yaml}
uploads: {max_file_bytes: 1073741824}
limits: {max_request_bytes: 65536, max_epochs: 50, max_steps: 100000}   # per request / per job (defaults shown)
sessions: {hours: 8}          # how long a dashboard sign-in lasts
inference:                    # chat/completions on the catalog models and their fine-tunes (engines.py)
  engines:
    support-tiny: {managed: {python: .venv-vllm/bin/python, max_loras: 4, max_model_len: 512}}
  max_n: 4                    # choices per request
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
from tunerun.jobs.errors import Problem, SpecError
from tunerun.jobs.loader import load_config, load_job_text, read_spec_text
from tunerun.jobs.service.engines import EngineEntry
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


class InferenceSettings(Strict):
    """Serving the catalog models and their fine-tunes: which engine serves each base, and what a request may ask."""

    engines: dict[str, EngineEntry] = Field({}, description="Catalog model → the vLLM engine serving it.")
    max_n: int = Field(4, ge=1, le=128, description="Choices one request may ask for.")
    max_request_bytes: int = Field(1 << 20, ge=4096, le=64 << 20, description="A chat history's size limit.")


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
                close = difflib.get_close_matches(name, self.models, n=1)
                raise field_error(f"inference.engines.{name}", f"'{name}' is not a model under models:"
                                  + (f" — did you mean '{close[0]}'?" if close else
                                     f" (they are {', '.join(self.models)})"))
        return self


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

"""The run folder, ``<storage>/<run-id>/``: its layout and its formats, owned by this module alone.

Every name inside a run folder is spelt here and nowhere else (tests/test_run_folder_layout.py checks), and every
file with a format has its typed reader and writer here: the resolved job (``job.yaml``), the events, the metrics
rows (`TrainRow`, `EvalRow`), the evaluation records (`EvalRecords`: base, per step, final), the checkpoints (listed
and verified against their manifests), the data report and the exports. The CLI, the service, compare, the report,
the model card, tracking and the trainer all read and write through it, so they agree on what a file holds. What
``run.json`` holds and who writes it is `tunerun.cluster.runs` (its name is here).

```
job.yaml  run.json  events.jsonl  metrics.jsonl  report.html  logs/driver.log  control/…
data/        train.jsonl eval.jsonl data_report.{json,html,png}
checkpoints/ step-000200/ … manifest.json (written last: the checkpoint is complete)
eval/        base.json step-000200.json on-demand/<source>.json exports/<source>-gguf-<quant>.json
final/       adapter/ or model/           exports/  <source>-merged/ <source>-gguf-<quant>/
```

Run folders outlive the tunerun that wrote them: a row or record with keys this version does not know still
reads, and a job.yaml with such keys reads with them named (`read_job`).

Object stores have no append and no cheap size check for a growing object: `RunFolder` buffers appends (see
`tunerun.cluster.s3`), and `JsonlTail` parses only the lines added since its last read on a local folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tunerun.cluster.storage import LocalBackend, backend_for
from tunerun.jobs.errors import RunNotFound, StorageError, UnreadableJob
from tunerun.jobs.spec import StorageSpec

log = logging.getLogger("tunerun")

# ── the names ───────────────────────────────────────────────────────────────────────────────────────────────
JOB = "job.yaml"  # the resolved job: the only thing that crosses from the submitter to the workers
RUN_INFO = "run.json"  # state, target and its handle, times (tunerun.cluster.runs)
EVENTS = "events.jsonl"
METRICS = "metrics.jsonl"
REPORT = "report.html"
SERVICE_RECORD = "service.json"  # `tunerun serve`'s record of a job: its project, request and file ids
DRIVER_LOG = "logs/driver.log"  # the driver's output, in the run folder (or copied there when it ends)
SBATCH_SCRIPT = "slurm/train.sbatch"  # the script a Slurm run was submitted with (tunerun.cluster.slurm)
# control/: requests and markers between the submitter, the service, the driver and rank 0 (tunerun.cluster.runs)
CONTROL = "control"
# Checkpoint-and-stop, asked for through the run folder: rank 0 of the workers polls for this object, so a request
# reaches the run on whatever target and node it trains (written by the driver on USR1/TERM, or by `Target.pause`).
CHECKPOINT_REQUEST = f"{CONTROL}/checkpoint_requested"
STOPPED = f"{CONTROL}/stopped_at_checkpoint"  # rank 0 stopped early on request (tunerun.trainer.preemption)
# Written by rank 0 when the next checkpoint would not fit (tunerun.cluster.space): the workers stopped, and the
# driver records the run as failed (disk_full) with the message this holds.
DISK_FULL = f"{CONTROL}/disk_full"
# Bytes set aside at the driver's start (local run folders) so the outcome can be recorded on a full disk.
RESERVED_OUTCOME = f"{CONTROL}/reserved_outcome"
# data/: the prepared data; the same names inside a data cache folder (tunerun.trainer.data.cache)
DATA = "data"
TRAIN_FILE, EVAL_FILE, DATA_REPORT_FILE = "train.jsonl", "eval.jsonl", "data_report.json"
DATA_REPORT_PAGES = ("data_report.html", "data_report.png")
PREPARED_FILES = (TRAIN_FILE, EVAL_FILE, *DATA_REPORT_PAGES, DATA_REPORT_FILE)
TRAIN_DATA, EVAL_DATA, DATA_REPORT = f"{DATA}/{TRAIN_FILE}", f"{DATA}/{EVAL_FILE}", f"{DATA}/{DATA_REPORT_FILE}"
# A full-fine-tune DPO run's reference log-probabilities of every prepared pair (tunerun.trainer.objectives.dpo)
REFERENCE_LOGPS = f"{DATA}/reference_logps.json"
CHECKPOINTS, CHECKPOINT_PREFIX, CHECKPOINT_MANIFEST = "checkpoints", "step-", "manifest.json"
EVAL, EVAL_BASE, EVAL_ON_DEMAND, EVAL_EXPORTS = "eval", "eval/base.json", "eval/on-demand", "eval/exports"
FINAL, EXPORTS = "final", "exports"
ARTIFACT_FOLDERS = (FINAL, EXPORTS)  # weights a user downloads: final/adapter, exports/*
# Beside any saved weights: the template prompts were rendered with in training (transformers' file name, which
# vLLM and transformers read), and the tokenizer's settings (its special tokens)
CHAT_TEMPLATE, TOKENIZER_CONFIG = "chat_template.jinja", "tokenizer_config.json"
PROGRESS = "progress.json"  # a checkpoint's counters, written by rank 0 (tunerun.trainer.checkpoint)
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: what makes a weights folder an adapter rather than a model
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's, in final/adapter and in adapter exports
TRAINABLE = "trainable.safetensors"  # a DDP checkpoint's trained (adapter) tensors under their live parameter names


def control(name: str) -> str:
    """A marker of the run's own (the service's start claims): ``control/<name>``."""
    return f"{CONTROL}/{name}"


def checkpoint_name(step: int) -> str:
    """``checkpoints/step-000200``."""
    return f"{CHECKPOINTS}/{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_label(weights: str) -> str:
    """What a weights folder is called in file names: ``step-000200`` for a checkpoint, ``final`` for final."""
    return weights.removeprefix(f"{CHECKPOINTS}/")


def final_weights(kind: str) -> str:
    """``final/adapter`` (LoRA, QLoRA) or ``final/model`` (full fine-tuning)."""
    return f"{FINAL}/{kind}"


def export_folder(weights: str, kind: str) -> str:
    """``exports/step-000200-merged``, ``exports/final-gguf-q4_k_m``."""
    return f"{EXPORTS}/{checkpoint_label(weights)}-{kind}"


def eval_record_name(step: int, phase: str) -> str:
    return EVAL_BASE if phase == "base" else f"{EVAL}/{CHECKPOINT_PREFIX}{step:06d}.json"


def on_demand_record_name(weights: str) -> str:
    return f"{EVAL_ON_DEMAND}/{checkpoint_label(weights)}.json"


def export_check_name(weights: str, kind: str) -> str:
    return f"{EVAL_EXPORTS}/{checkpoint_label(weights)}-{kind}.json"


# ── the folder ──────────────────────────────────────────────────────────────────────────────────────────────

FILES_IN_FLIGHT = 4  # files transferred side by side: a checkpoint of many small files is mostly request latency


class RunFolder:
    """Files of one run, addressed by their name relative to ``<storage>/<run-id>/``."""

    def __init__(self, storage: StorageSpec | str, run_id: str):
        self.storage = StorageSpec(uri=storage) if isinstance(storage, str) else storage
        self.backend = backend_for(self.storage)
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"RunFolder({self.uri()!r})"

    def _key(self, name: str) -> str:
        return f"{self.run_id}/{name}" if name else self.run_id

    def uri(self, name: str = "") -> str:
        return self.backend.uri(self._key(name))

    @property
    def is_local(self) -> bool:
        return isinstance(self.backend, LocalBackend)

    def local_path(self, name: str = "") -> Path:
        """The on-disk path of ``name``; only for run folders on a local (or shared) filesystem."""
        if not self.is_local:
            raise StorageError(f"{self.uri(name)} is not on a local filesystem")
        return self.backend.local_path(self._key(name))

    def exists(self, name: str = "") -> bool:
        return self.backend.exists(self._key(name))

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.backend.get(self._key(name))
        except FileNotFoundError:
            raise StorageError(f"{self.uri(name)} does not exist") from None

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_text(self, name: str, text: str) -> None:
        """Atomic on every backend: readers (a following CLI, a restarted worker) never see half a file."""
        self.write_bytes(name, text.encode("utf-8"))

    def write_bytes(self, name: str, data: bytes) -> None:
        self.backend.put(self._key(name), data)

    def claim(self, name: str, obj) -> bool:
        """Write ``name`` only if no one has (an exclusive create on disk, a conditional write on S3): of several
        processes claiming the same name, exactly one gets True."""
        return self.backend.put_new(self._key(name), (json.dumps(obj, sort_keys=True) + "\n").encode("utf-8"))

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str):
        return json.loads(self.read_text(name))

    def read_json_if_there(self, name: str, default=None):
        data = self._get_if_there(name)
        return default if data is None else json.loads(data)

    def _get_if_there(self, name: str) -> bytes | None:
        """One request on object storage, where asking first whether it exists would be two."""
        try:
            return self.backend.get(self._key(name))
        except FileNotFoundError:
            return None

    def append_jsonl(self, name: str, record: dict) -> None:
        self.backend.append(self._key(name), (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))

    def flush(self) -> None:
        """Push buffered appends (object stores have no append; see S3Backend)."""
        self.backend.flush()

    def read_jsonl(self, name: str) -> list[dict]:
        data = self._get_if_there(name) or b""
        return [row for row in map(_parsed, data.splitlines()) if row is not None]

    def list_dir(self, name: str) -> list[str]:
        return self.backend.children(self._key(name))

    def list_files(self, name: str) -> dict[str, int]:
        """Files below ``name`` as {path relative to name: size}."""
        prefix = self._key(name).rstrip("/") + "/"
        return {key[len(prefix):]: size for key, size in self.backend.list(self._key(name)).items()
                if key.startswith(prefix)}

    def upload_dir(self, local: Path, name: str) -> None:
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.backend.upload_file(path, self._key(f"{name}/{path.relative_to(local)}"))

    def upload_hashed(self, local: Path, name: str) -> dict[str, dict]:
        """Upload the files below ``local`` a few at a time and return them as {relative path: {size, sha256}}
        (a checkpoint manifest's entries), each hashed in the read that feeds its upload."""
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())

        def upload(path: Path) -> tuple[str, dict]:
            relative = str(path.relative_to(local))
            sha256 = self.backend.upload_hashed(path, self._key(f"{name}/{relative}"))
            return relative, {"size": path.stat().st_size, "sha256": sha256}

        with ThreadPoolExecutor(FILES_IN_FLIGHT) as pool:
            return dict(pool.map(upload, files))

    def download_hashed(self, name: str, local: Path, size: int = 0) -> str:
        """Download ``name`` to ``local`` and return the sha256 of its bytes, hashed as they are written."""
        return self.backend.download_hashed(self._key(name), Path(local), size)

    def upload(self, local: Path, name: str) -> None:
        self.backend.upload_file(Path(local), self._key(name))

    def download(self, name: str, local: Path) -> Path:
        self.backend.download_file(self._key(name), Path(local))
        return Path(local)

    def download_dir(self, name: str, local: Path) -> Path:
        for relative in self.list_files(name):
            self.backend.download_file(self._key(f"{name}/{relative}"), Path(local) / relative)
        return Path(local)

    def delete(self, name: str) -> None:
        self.backend.delete_prefix(self._key(name))

    def event(self, kind: str, **fields) -> None:
        self.append_jsonl(EVENTS, {"time": time.time(), "event": kind, **fields})


class RunStore:
    """All runs under one storage location."""

    def __init__(self, storage: StorageSpec | str):
        self.storage = StorageSpec(uri=storage) if isinstance(storage, str) else storage
        self.backend = backend_for(self.storage)

    def open(self, run_id: str) -> RunFolder:
        run = RunFolder(self.storage, run_id)
        if not run.exists(RUN_INFO):
            known = ", ".join(self.run_ids()[-5:]) or "none"
            raise RunNotFound(f"no run '{run_id}' in {self.storage.uri} (recent runs: {known}); "
                              "pass --storage if the run lives elsewhere")
        return run

    def run_ids(self) -> list[str]:
        return [name for name in self.backend.children("") if self.backend.exists(f"{name}/{RUN_INFO}")]

    def runs(self) -> Iterator[RunFolder]:
        for run_id in self.run_ids():
            yield RunFolder(self.storage, run_id)


# ── JSON lines ──────────────────────────────────────────────────────────────────────────────────────────────


def _parsed(line: bytes) -> dict | None:
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:  # a line still being written by another process, or cut off: skipped
        return None


class JsonlTail:
    """events.jsonl and metrics.jsonl only grow: on a local run folder, parse just the lines added since the last
    read (many clients poll a training job every second; re-parsing thousands of lines each time slowed its
    steps, bench/bench_serve.py). Object storage has no cheap size check for a growing object: read it whole.
    ``convert`` (a typed row from a record, None to skip it) runs once per line too, not once per read."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: dict[tuple[Path, Callable | None], tuple[int, list]] = {}

    def records(self, run: RunFolder, name: str, convert: Callable[[dict], object] | None = None) -> list:
        if not run.is_local:
            return _converted(run.read_jsonl(name), convert)
        path = run.local_path(name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return []
        with self._lock:
            offset, parsed = self._seen.get((path, convert), (0, []))
            if size < offset:  # rewritten (not appended): start again
                offset, parsed = 0, []
            if size > offset:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read(size - offset)
                complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for next time
                added = [row for row in map(_parsed, complete.splitlines()) if row is not None]
                parsed = parsed + _converted(added, convert)
                offset += len(complete)
                self._seen[(path, convert)] = (offset, parsed)
            return parsed


def _converted(records: list[dict], convert: Callable[[dict], object] | None) -> list:
    return records if convert is None else [row for row in map(convert, records) if row is not None]


def _read_jsonl(run: RunFolder, name: str, tail: JsonlTail | None, convert=None) -> list:
    return tail.records(run, name, convert) if tail else _converted(run.read_jsonl(name), convert)


def events(run: RunFolder, tail: JsonlTail | None = None) -> list[dict]:
    """The lifecycle events, oldest first: ``{"time", "event", …fields}``."""
    return _read_jsonl(run, EVENTS, tail)


# ── the resolved job ────────────────────────────────────────────────────────────────────────────────────────


def write_job(run: RunFolder, job) -> None:
    run.write_text(JOB, yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))


def read_job(run: RunFolder, to_run: bool = False):
    """The `ResolvedJob` a run was started with. Keys this tunerun does not know (a newer tunerun wrote them) are
    named in a warning and left out when the job is only shown; a job ``to_run`` must read whole, since training
    without a setting the user gave would not be their job. Anything else that does not read is `UnreadableJob`,
    naming each field and the tunerun version that wrote the file."""
    from tunerun.jobs.plan import TUNERUN_VERSION, ResolvedJob

    text = run.read_text(JOB)  # a storage error (transient, or no such file) is not the file's fault
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UnreadableJob(f"{run.uri(JOB)} cannot be read as a job ({_first_line(exc)})") from None
    try:
        return ResolvedJob.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    unknown = [e["loc"] for e in errors if e["type"] == "extra_forbidden"]
    if to_run or len(unknown) < len(errors) or not isinstance(data, dict):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        written = data.get("tunerun_version") if isinstance(data, dict) else None
        if written and str(written) != TUNERUN_VERSION:
            raise UnreadableJob(f"{run.uri(JOB)} was written by tunerun {written} and this server runs tunerun "
                                f"{TUNERUN_VERSION}, which cannot read it ({problems})")
        raise UnreadableJob(f"{run.uri(JOB)} cannot be read as a job ({problems})")
    for loc in unknown:
        _drop(data, loc)
    log.warning("%s: keys this tunerun does not know were left out: %s", run.uri(JOB),
                ", ".join(".".join(map(str, loc)) for loc in unknown))
    return ResolvedJob.model_validate(data)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _drop(data, loc: tuple) -> None:
    *parents, last = loc
    for key in parents:
        data = data[key]
    data.pop(last, None)


# ── metrics rows ────────────────────────────────────────────────────────────────────────────────────────────


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow")  # rows of another tunerun version keep what they hold

    step: int
    time: float = 0.0


class TrainRow(_Row):
    """One optimizer step, written by rank 0."""

    loss: float
    lr: float | None = None
    epoch: int | None = None
    tokens_per_s: float | None = None
    tokens_seen: int | None = None
    total_steps: int | None = None
    elapsed_s: float | None = None


class EvalRow(_Row):
    """One evaluation: held-out metrics as ``eval_<name>``, the general sample's as ``general_<name>``, the
    forgetting check as ``forgetting_*``; ``base`` marks the untrained model's (step 0)."""

    base: bool = False

    @property
    def held_out(self) -> dict[str, float]:
        """{metric name: value} of the eval set, without the ``eval_`` prefix (unmeasured ones left out)."""
        return {k.removeprefix("eval_"): v for k, v in (self.model_extra or {}).items()
                if k.startswith("eval_") and v is not None}

    def value(self, key: str):
        return (self.model_extra or {}).get(key)

    @classmethod
    def from_record(cls, record: dict) -> "EvalRow":
        """The flat row of an evaluation record (`tunerun.trainer.evaluation.records`)."""
        row = {}
        for name, value in record["metrics"].items():
            row[name if name.startswith("forgetting") else f"eval_{name}"] = value
        row.update({f"general_{name}": value for name, value in record.get("general", {}).items()})
        return cls(step=record["step"], time=record.get("time", time.time()), base=record["base"], **row)


def row_of(raw: dict) -> TrainRow | EvalRow | None:
    """A train row has a training ``loss``; every other row with a step is an evaluation (None: not a row)."""
    try:
        return TrainRow.model_validate(raw) if "loss" in raw else EvalRow.model_validate(raw)
    except ValidationError:
        return None


@dataclass
class MetricRows:
    train: list[TrainRow] = field(default_factory=list)
    evals: list[EvalRow] = field(default_factory=list)
    ordered: list[TrainRow | EvalRow] = field(default_factory=list)  # as written

    @property
    def last_train(self) -> TrainRow | None:
        return self.train[-1] if self.train else None

    def tuned_evals(self) -> list[EvalRow]:
        """Evaluations of the model being trained (the base model's at step 0 are not its own)."""
        return [row for row in self.evals if not row.base]


def metric_rows(run: RunFolder, tail: JsonlTail | None = None) -> MetricRows:
    rows = MetricRows()
    for row in _read_jsonl(run, METRICS, tail, row_of):  # parsed and typed once per line with a tail
        rows.ordered.append(row)
        (rows.train if isinstance(row, TrainRow) else rows.evals).append(row)
    return rows


def append_metrics(run: RunFolder, row: TrainRow | EvalRow | dict) -> None:
    run.append_jsonl(METRICS, row if isinstance(row, dict) else row.model_dump(exclude_none=True))


# ── evaluation records ──────────────────────────────────────────────────────────────────────────────────────


@dataclass
class EvalRecords:
    """``eval/``: the base model's record, one per evaluation step, and those `tunerun eval` added."""

    base: dict | None = None
    steps: list[dict] = field(default_factory=list)  # by step
    on_demand: list[dict] = field(default_factory=list)
    export_checks: list[dict] = field(default_factory=list)  # GGUF files checked against the HF model

    @property
    def final(self) -> dict | None:
        """The record of the final evaluation, or while the run trains the newest: what the run reached."""
        finals = [r for r in self.steps if r.get("phase") == "final"]
        return (finals or self.steps or [None])[-1]


def eval_records(run: RunFolder) -> EvalRecords:
    names = run.list_dir(EVAL)
    steps = [run.read_json(f"{EVAL}/{n}") for n in names if n.startswith(CHECKPOINT_PREFIX) and n.endswith(".json")]
    return EvalRecords(
        base=run.read_json(EVAL_BASE) if EVAL_BASE.rsplit("/", 1)[-1] in names else None,
        steps=sorted(steps, key=lambda r: r["step"]),
        on_demand=[run.read_json(f"{EVAL_ON_DEMAND}/{n}") for n in run.list_dir(EVAL_ON_DEMAND) if n.endswith(".json")],
        export_checks=[run.read_json(f"{EVAL_EXPORTS}/{n}") for n in run.list_dir(EVAL_EXPORTS)
                       if n.endswith(".json")])


def base_record(run: RunFolder) -> dict | None:
    return run.read_json_if_there(EVAL_BASE)


# ── data report ─────────────────────────────────────────────────────────────────────────────────────────────


def data_report(run: RunFolder) -> dict | None:
    """``data/data_report.json`` once the run has prepared its data (None before)."""
    return run.read_json_if_there(DATA_REPORT)


# ── checkpoints ─────────────────────────────────────────────────────────────────────────────────────────────


def checkpoint_folders(run: RunFolder) -> list[str]:
    """Every ``step-…`` folder, complete or not, oldest first."""
    return sorted(n for n in run.list_dir(CHECKPOINTS)
                  if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit())


def step_of(folder: str) -> int:
    return int(folder.rsplit("/", 1)[-1][len(CHECKPOINT_PREFIX):])


def manifest_name(folder: str) -> str:
    return f"{CHECKPOINTS}/{folder}/{CHECKPOINT_MANIFEST}"


def complete_checkpoints(run: RunFolder) -> list[str]:
    """Names of the checkpoint folders that have a manifest, oldest first."""
    return [name for name in checkpoint_folders(run) if run.exists(manifest_name(name))]


def saved_world_size(run: RunFolder) -> int | None:
    """World size recorded by the newest checkpoint that has a manifest (None when there is none)."""
    complete = complete_checkpoints(run)
    if not complete:
        return None
    return json.loads(run.read_text(f"{CHECKPOINTS}/{complete[-1]}/{PROGRESS}")).get("world_size") or None


def complete_manifests(run: RunFolder) -> dict[str, dict]:
    """{checkpoint folder name: its manifest} for every checkpoint that has one."""
    return {name: run.read_json(manifest_name(name)) for name in complete_checkpoints(run)}


def last_complete_checkpoint(run: RunFolder) -> str | None:
    """The newest checkpoint folder with a manifest (``checkpoints/step-000200``): where a resume starts."""
    complete = complete_checkpoints(run)
    return f"{CHECKPOINTS}/{complete[-1]}" if complete else None


def write_manifest(run: RunFolder, folder: str, step: int, digests: dict[str, dict],
                   metrics: dict | None = None) -> dict:
    """Rank 0, after every rank's files are persisted: check they all arrived, then write the manifest (with the
    eval ``metrics`` of this step, which keep-best retention ranks checkpoints by). ``folder``: checkpoint_name."""
    stored = run.list_files(folder)
    for path, entry in digests.items():
        if stored.get(path) != entry["size"]:
            raise StorageError(f"checkpoint {folder}: {path} is missing or incomplete on the store "
                               f"({stored.get(path)} of {entry['size']} bytes)")
    manifest = {"step": step, "metrics": metrics or {},
                "files": [{"path": p, **e} for p, e in sorted(digests.items())]}
    run.write_json(f"{folder}/{CHECKPOINT_MANIFEST}", manifest)
    return manifest


def stored_manifest(run: RunFolder, folder: str) -> tuple[dict | None, str | None]:
    """(the manifest of ``checkpoints/<folder>``, None) when every file it names is stored at its size, else
    (None or the manifest, why not): a cheap listing catches missing and truncated objects before any download."""
    key = manifest_name(folder)
    if not run.exists(key):
        return None, "no manifest (incomplete save)"
    try:
        manifest = run.read_json(key)
    except json.JSONDecodeError:
        return None, "manifest is not valid JSON"
    stored = run.list_files(f"{CHECKPOINTS}/{folder}")
    for entry in manifest["files"]:
        if stored.get(entry["path"]) != entry["size"]:
            return manifest, f"{entry['path']} is missing or has the wrong size"
    return manifest, None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(folder: Path, manifest: dict | None = None) -> str | None:
    """None when the checkpoint in the local ``folder`` matches its manifest file by file, else why it does not."""
    if manifest is None:
        try:
            manifest = json.loads((folder / CHECKPOINT_MANIFEST).read_text())
        except FileNotFoundError:
            return "no manifest (incomplete save)"
        except json.JSONDecodeError:
            return "manifest is not valid JSON"
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            return f"{entry['path']} is missing"
        if path.stat().st_size != entry["size"] or sha256_of(path) != entry["sha256"]:
            return f"{entry['path']} does not match its sha256"
    return None

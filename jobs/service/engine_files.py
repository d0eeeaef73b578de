"""The files a vLLM engine reads, copied from the storage: a catalog model's base weights with the chat template they
carry, and the adapters of the model's succeeded fine-tuning jobs (and of their checkpoints the gateway is asked for).

vLLM reads a model and an adapter only from a local path (``--model DIR``, ``/v1/load_lora_adapter {lora_path}``),
and on Kubernetes the server's storage is S3: `tunerun serve render` (`tunerun.jobs.service.deploy`) gives each
engine pod emptyDirs that these commands fill, from the tunerun image: ``base`` as an init container, ``adapters`` as
a sidecar that looks for new adapters every few seconds. A folder appears whole or not at all: it is copied into a
temp folder under ``<into>/.incoming`` (the same filesystem) and renamed into place, so vLLM never reads half an
adapter. An adapter lands at
``<into>/<run-id>/final/adapter`` (`adapter_key`), exactly where the gateway tells an external engine with
``adapters: <into>`` to read it. A checkpoint model (``ft:…:ckpt-step-N``) is copied on demand: the gateway writes
its adapter into the run folder on its first request and leaves a note in the storage
(`tunerun.jobs.service.checkpoint_adapters.wanted_checkpoints`); the sidecar's next pass copies it to
``<into>/<run-id>/exports/step-…-adapter`` (that first request is 503 with ``Retry-After`` until then).
Torch-free, like the rest of the service.

    python -m tunerun.jobs.service.engine_files base --storage '{"uri": "s3://models/llama-8b"}' --into /base
    python -m tunerun.jobs.service.engine_files adapters --storage '{"uri": "s3://training/tunerun"}' \\
        --model support-8b --into /adapters --every 10
    python -m tunerun.jobs.service.engine_files chat-template /shared/models/llama-8b --out chat-template.jinja
"""
from __future__ import annotations

import argparse
import json
import logging
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from tunerun.cluster.run_folder import ADAPTER_CONFIG, ADAPTER_FILE, CHAT_TEMPLATE, RUN_INFO, SERVICE_RECORD, \
    TOKENIZER_CONFIG, RunFolder
from tunerun.cluster.runs import RunState, read_info
from tunerun.cluster.storage import backend_for
from tunerun.jobs.errors import StorageError, TunerunError
from tunerun.jobs.service.chat import source_of_weights
from tunerun.jobs.service.checkpoint_adapters import checkpoint_adapter_folder, wanted_checkpoints
from tunerun.jobs.service.engines import adapter_key
from tunerun.jobs.service.fine_tuning import JobFolders, ServiceRecord
from tunerun.jobs.spec import StorageSpec

logger = logging.getLogger("tunerun.serve.engine_files")
BASE_MODEL, BASE_TEMPLATE = "model", "chat-template.jinja"  # below `base`'s --into: vLLM's --model, --chat-template
INCOMING = ".incoming"  # below --into: copies not yet whole
# A job that ended without succeeding is looked at again this rarely (`tunerun run --resume` can still finish it).
ENDED_LOOK_S = 300.0


def copy_prefix(backend, prefix: str, target: Path, scratch: Path) -> int:
    """Every file below ``prefix`` of a storage backend into the folder ``target``, which appears whole or not at
    all: the files go into a temp folder in ``scratch`` (on the same filesystem, where nobody reads) and are renamed
    into place at once. The bytes copied."""
    files = backend.list(prefix)
    if not files:
        raise StorageError(f"{backend.uri(prefix)}: no files there")
    partial = scratch / f"{target.name}.{secrets.token_hex(4)}"
    try:
        for key, size in files.items():
            local = partial / _relative(key, prefix)
            backend.download_file(key, local)
            if local.stat().st_size != size:
                raise StorageError(f"{backend.uri(key)}: copied {local.stat().st_size} bytes, expected {size}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # after the rename: already gone
    return sum(files.values())


def _relative(key: str, prefix: str) -> str:
    """``key`` below ``prefix`` as a relative path that stays inside the copy (an object store's key may hold
    ``..``)."""
    relative = PurePosixPath(key[len(prefix):].lstrip("/") if prefix else key)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise StorageError(f"{key!r} cannot be copied: its name leaves the folder it is copied into")
    return str(relative)


def _fresh_scratch(into: Path) -> Path:
    """``<into>/.incoming``, emptied: copies a container that died left there are never finished."""
    scratch = into / INCOMING
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return scratch


# ── the base model ──────────────────────────────────────────────────────────────────────────────────────────

def write_chat_template(model: Path, out: Path) -> None:
    """The chat template ``model``'s weights carry (the rule the gateway renders with, `source_of_weights`) into
    ``out``, whole."""
    def text(name: str) -> str | None:
        path = model / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    config = json.loads(text(TOKENIZER_CONFIG) or "{}")
    source = source_of_weights(text(CHAT_TEMPLATE), config)
    if not isinstance(source, str):  # a tokenizer config may hold a list of named templates
        raise StorageError(f"{model / TOKENIZER_CONFIG}: its chat_template is not one template; save the one the "
                           f"model was trained with as {CHAT_TEMPLATE} beside the weights")
    partial = out.with_name(f".{out.name}.{secrets.token_hex(4)}")
    partial.write_text(source, encoding="utf-8")
    partial.replace(out)


def fetch_base(storage: StorageSpec, into: Path) -> Path:
    """The model at ``storage.uri`` into ``<into>/model`` and its chat template into ``<into>/chat-template.jinja``;
    a copy made by an earlier start of the pod's init container is kept."""
    model = into / BASE_MODEL
    if model.is_dir():
        logger.info("%s is there already", model)
    else:
        started = time.monotonic()
        size = copy_prefix(backend_for(storage), "", model, _fresh_scratch(into))
        logger.info("copied %s into %s: %.1f GiB in %.0f s", storage.uri, model, size / 2**30,
                    time.monotonic() - started)
    write_chat_template(model, into / BASE_TEMPLATE)
    return model


# ── the adapters ────────────────────────────────────────────────────────────────────────────────────────────

class AdapterMirror:
    """Keeps ``into`` holding the adapter of every succeeded job of ``model`` in the storage: those the gateway would
    load (a ``final/adapter`` with PEFT's ``adapter_config.json``), and the checkpoint adapters of those jobs the
    gateway has been asked for. A job's weights never change once it has succeeded, so each is copied once; a job
    that ended otherwise is looked at again only now and then."""

    def __init__(self, storage: StorageSpec, model: str, into: Path):
        self.storage, self.model, self.into = storage, model, Path(into)
        self.jobs = JobFolders(storage)
        self.backend = backend_for(storage)
        self.scratch = _fresh_scratch(self.into)
        self._done: set[str] = set()  # copied, another model's, or never an adapter (a full fine-tune)
        self._ours: set[str] = set()  # of those, this model's adapters: their checkpoints may be asked for
        self._not_before: dict[str, float] = {}  # ended without succeeding: when to look again
        self._checkpoints_done: set[tuple[str, int]] = set()

    def sync(self) -> list[str]:
        """One pass over the storage's jobs, then over the checkpoints the gateway was asked for; what was copied:
        a job's id for its adapter, ``<job id>/exports/step-…-adapter`` for a checkpoint's. A job that cannot be
        read or copied now is logged and tried again on the next pass."""
        copied = []
        for job_id in self.jobs.run_ids():
            if job_id in self._done or self._not_before.get(job_id, 0.0) > time.monotonic():
                continue
            try:
                if self._look(job_id):
                    copied.append(job_id)
            except (TunerunError, OSError, ValueError, ValidationError, TypeError) as exc:
                logger.warning("job %s: its adapter is not copied yet (tried again next pass): %s", job_id, exc)
        return copied + self._checkpoints()

    def _look(self, job_id: str) -> bool:
        target = self.into / adapter_key(job_id)
        if (target / ADAPTER_CONFIG).is_file():  # copied by an earlier start of this container
            self._done.add(job_id)
            self._ours.add(job_id)
            return False
        run = RunFolder(self.storage, job_id)
        record = run.read_json_if_there(SERVICE_RECORD)
        if record is None or not run.exists(RUN_INFO):
            return False  # not a job yet: its record comes first, then run.json
        if ServiceRecord(**record).model != self.model:
            self._done.add(job_id)
            return False
        state = read_info(run).state
        if state != RunState.SUCCEEDED:
            if state in (RunState.FAILED, RunState.CANCELLED):  # a paused job (preempted) is resumed by the API
                self._not_before[job_id] = time.monotonic() + ENDED_LOOK_S
            return False
        key = adapter_key(job_id)
        if not self.backend.exists(f"{key}/{ADAPTER_CONFIG}"):
            self._done.add(job_id)  # a full fine-tune: the gateway does not serve it from this engine
            return False
        size = copy_prefix(self.backend, key, target, self.scratch)
        self._done.add(job_id)
        self._ours.add(job_id)
        logger.info("job %s: adapter copied (%.1f MiB)", job_id, size / 2**20)
        return True

    def _checkpoints(self) -> list[str]:
        """Copy the checkpoint adapters of this model's jobs that the gateway was asked for and this pod has not."""
        copied = []
        for wanted in wanted_checkpoints(self.backend):
            job_id, step = wanted
            if wanted in self._checkpoints_done or job_id not in self._done:
                continue  # copied, or its job not looked at yet (next pass)
            key = adapter_key(job_id, checkpoint_adapter_folder(step))
            try:
                if job_id in self._ours and not (self.into / key / ADAPTER_FILE).is_file():
                    size = copy_prefix(self.backend, key, self.into / key, self.scratch)
                    logger.info("job %s: the adapter of step %d copied (%.1f MiB)", job_id, step, size / 2**20)
                    copied.append(key)
            except (TunerunError, OSError) as exc:
                logger.warning("%s is not copied yet (tried again next pass): %s", key, exc)
                continue
            self._checkpoints_done.add(wanted)
        return copied

    def run(self, every_s: float, stop: threading.Event | None = None) -> None:
        """`sync` every ``every_s`` seconds until ``stop`` is set; an error of one pass is logged, never the end."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.sync()
            except Exception:  # a sidecar that died would leave new jobs unservable: log it, go on
                logger.exception("the storage's jobs could not be listed; trying again in %.0f s", every_s)
            stop.wait(every_s)


# ── the command ─────────────────────────────────────────────────────────────────────────────────────────────

def _storage(text: str) -> StorageSpec:
    try:
        return StorageSpec.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise argparse.ArgumentTypeError(f"expected a storage block as JSON ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunerun.jobs.service.engine_files", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("base", help="copy a base model and write the chat template its weights carry")
    base.add_argument("--storage", type=_storage, required=True, help="the storage block, its uri the model's")
    base.add_argument("--into", type=Path, required=True)
    adapters = commands.add_parser("adapters", help="keep a folder holding the adapters of a model's succeeded jobs")
    adapters.add_argument("--storage", type=_storage, required=True, help="server.yaml's storage block, as JSON")
    adapters.add_argument("--model", required=True, help="the catalog model the engine serves")
    adapters.add_argument("--into", type=Path, required=True)
    adapters.add_argument("--every", type=float, default=10.0, help="seconds between looks (default 10)")
    adapters.add_argument("--once", action="store_true", help="one look, then exit")
    template = commands.add_parser("chat-template", help="write the chat template a local model's weights carry")
    template.add_argument("model", type=Path)
    template.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "base":
            fetch_base(args.storage, args.into)
        elif args.command == "chat-template":
            write_chat_template(args.model, args.out)
        else:
            mirror = AdapterMirror(args.storage, args.model, args.into)
            if args.once:
                mirror.sync()
            else:
                mirror.run(args.every)
    except TunerunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

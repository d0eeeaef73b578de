"""Export in Hugging Face format: what ``tunerun export RUN [--merge]`` writes.

Sources: the run's final weights or any complete checkpoint (`tunerun.trainer.weights.find_weights`). Exports:
the LoRA adapter in PEFT format; with ``merge``, the adapter folded into the base reloaded *unquantised* from
``model.path`` (QLoRA trains against 4-bit weights, but merging into them would bake the quantisation error into
every layer); for full runs the consolidated weights. Every export holds safetensors, the tokenizer, the
generation config and a model card, loads with plain ``from_pretrained``, and is written to a temp folder beside
the target that is renamed into place last. A ``to`` of ``s3://bucket/prefix`` (which must be empty) uploads the
finished folder with the run storage's endpoint and credentials, the model card last.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tunerun.cluster.run_folder import ADAPTER_CONFIG, FINAL, export_folder
from tunerun.jobs.errors import StorageError
from tunerun.trainer.export.card import model_card
from tunerun.trainer.weights import RunWeights, find_weights, run_local_path

MAX_SHARD_SIZE = "5GB"


def default_target(run, weights: RunWeights, merge: bool) -> Path:
    kind = "model" if weights.full else ("merged" if merge else "adapter")
    return run_local_path(run, export_folder(weights.name, kind))


def export_run(run, job, checkpoint: int | None, merge: bool, to: str | None) -> tuple[Path | str, RunWeights]:
    """Write the export and return (its folder, or the s3:// URI it was uploaded to; what it was made from)."""
    remote = to if to is not None and "://" in to else None
    bucket = export_bucket(remote, job.spec.storage) if remote else None  # refused before the work, not after
    scratch = Path(tempfile.mkdtemp(prefix="tunerun-export-"))
    try:
        weights = find_weights(run, job, checkpoint, scratch)
        if remote:
            target = scratch / "upload" / default_target(run, weights, merge).name
        else:
            target = Path(to).expanduser().absolute() if to else default_target(run, weights, merge)
        with staged(target) as staging:
            if merge or weights.full:  # a full run's weights are a whole model either way
                write_merged_model(job, weights, staging)
            else:
                _write_adapter(job, weights, staging)
            write_tokenizer_and_generation_config(job, staging)
            (staging / "README.md").write_text(model_card(run, job, weights, merged=merge or weights.full),
                                               encoding="utf-8")
        if remote:
            upload_export(target, bucket)
            return remote, weights
        return target, weights
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def export_bucket(uri: str, storage):
    """The object-storage prefix ``uri`` (reached with the run storage's endpoint and credentials), if empty."""
    from tunerun.cluster.storage import backend_for

    if not uri.startswith("s3://"):
        raise StorageError(f"--to {uri}: only local folders and s3:// URIs are export targets")
    backend = backend_for(storage.model_copy(update={"uri": uri.rstrip("/")}))
    if backend.list(""):
        raise StorageError(f"export target {uri} already holds objects; choose another --to or remove them")
    return backend


# Uploaded last: a listing that shows the model card (and a GGUF export's Modelfile) shows a complete upload.
LAST_UPLOADED = ("Modelfile", "README.md")


def upload_export(folder: Path, backend) -> None:
    """Copy a finished export to object storage, file by file: boto3 streams large files in parts and an object
    appears only when its upload completed."""
    def order(path: Path) -> tuple[int, str]:
        return (LAST_UPLOADED.index(path.name) + 1 if path.name in LAST_UPLOADED else 0, path.name)

    for path in sorted(folder.iterdir(), key=order):
        backend.upload_file(path, path.name)  # the backend turns botocore's errors into one StorageError


@contextmanager
def staged(target: Path):
    """A temp folder beside ``target``, renamed to it on success and removed on failure: an interrupted export
    never leaves something under the final name that looks complete."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise StorageError(f"export target {target} already exists; choose another --to or remove it")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise StorageError(f"export target {target} is not writable: {blocking} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is for others (vLLM, Ollama) to read
    except OSError as exc:
        raise StorageError(f"export target {target} is not writable: {exc.strerror or exc}") from None
    try:
        yield staging
        if target.is_dir():
            target.rmdir()  # the empty folder the check above allowed
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_merged_model(job, weights: RunWeights, out: Path) -> None:
    """The whole trained model as safetensors shards: adapters merged into the unquantised base, or a full run's
    consolidated weights (the method decides, `Method.merged_model`)."""
    from tunerun.trainer.methods import method_for

    model = method_for(job.spec.method).merged_model(job, weights)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)


def _write_adapter(job, weights: RunWeights, out: Path) -> None:
    from tunerun.cluster.run_folder import ADAPTER_FILE

    if weights.name == FINAL:
        for name in (ADAPTER_CONFIG, ADAPTER_FILE):
            shutil.copy2(weights.folder / name, out / name)
        return
    # From a checkpoint: PEFT writes the config and the renamed tensors; the base is only needed for its shapes,
    # so it is built on the meta device (no weights loaded) and only the adapter tensors are real.
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunerun.cluster.run_folder import TRAINABLE
    from tunerun.trainer.methods.lora import add_adapters

    config = AutoConfig.from_pretrained(job.spec.model.path, trust_remote_code=job.spec.model.trust_remote_code)
    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=job.spec.model.trust_remote_code)
    model = add_adapters(base, job)
    model.load_state_dict(load_file(str(weights.folder / TRAINABLE)), strict=False, assign=True)
    model.peft_config["default"].base_model_name_or_path = job.spec.model.path
    model.save_pretrained(out, safe_serialization=True)


def write_tokenizer_and_generation_config(job, out: Path) -> None:
    from tunerun.trainer.tokenizer import load_tokenizer, save_tokenizer

    save_tokenizer(load_tokenizer(job), out)
    # tokenizer.model: the SentencePiece file llama.cpp's GGUF converter reads (save_pretrained of a fast
    # tokenizer drops it); generation_config.json: adapters get none from save_pretrained.
    for name in ("tokenizer.model", "generation_config.json"):
        source = Path(job.spec.model.path) / name
        if source.is_file() and not (out / name).exists():
            shutil.copy2(source, out / name)

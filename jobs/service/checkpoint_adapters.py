"""A checkpoint of an adapter job as the PEFT adapter folder vLLM loads: what OpenAI's checkpoint models
(``ft:…:ckpt-step-N``) are called through.

A DDP checkpoint keeps the trained tensors as ``trainable.safetensors`` under their live parameter names
(``…q_proj.lora_A.default.weight``: PEFT's adapter name is part of them); an adapter folder names them as PEFT saves
them (``…q_proj.lora_A.weight``) beside ``adapter_config.json``. Renaming is a rewrite of the safetensors header
(its JSON): the tensor bytes are copied as they are, and nothing here needs torch. The folder is written where
``tunerun export --checkpoint N`` writes the same adapter (``exports/step-…-adapter``), so it is made once, lives
with the run, and an engine that mounts the storage reads it there. Checkpoints of QLoRA under ZeRO-3 hold DeepSpeed
partitions instead: those need the trainer (``tunerun export``), and are refused here by name.

An engine pod on Kubernetes has no mount of the storage: its sidecar copies adapters into the pod
(`tunerun.jobs.service.engine_files`). Which checkpoints to copy it learns from the storage: each checkpoint adapter
the gateway is asked for leaves an empty object ``_service/checkpoint-adapters/<run id>~<step>`` (`WANTED`), so the
sidecar lists one prefix per pass instead of every run's exports, and copies only what is called.
"""
from __future__ import annotations

import json

from tunerun.cluster.run_folder import (ADAPTER_CONFIG, ADAPTER_FILE, CHAT_TEMPLATE, TOKENIZER_CONFIG, TRAINABLE,
                                        RunFolder, checkpoint_name, export_folder, final_weights, manifest_name)
from tunerun.jobs.errors import StorageError

ADAPTER_NAME = ".default."  # PEFT's default adapter name, as it appears in live parameter names
WANTED = "_service/checkpoint-adapters"  # below the storage root: <run id>~<step>, one per checkpoint called


class NoCheckpoint(StorageError):
    """The run has no complete checkpoint at that step."""


class NotAnAdapter(StorageError):
    """The checkpoint's trained tensors are not in a form this module renames (DeepSpeed partitions)."""


def checkpoint_adapter(run: RunFolder, step: int) -> str:
    """The run-folder path of step ``step``'s adapter in PEFT's layout, written on first use; `NoCheckpoint` or
    `NotAnAdapter` when there is nothing to serve."""
    checkpoint = checkpoint_name(step)
    target = checkpoint_adapter_folder(step)
    if run.exists(f"{target}/{ADAPTER_FILE}"):
        _want(run, step)
        return target
    if not run.exists(manifest_name(checkpoint.rsplit("/", 1)[-1])):
        raise NoCheckpoint(f"step {step} has no complete checkpoint")
    if not run.exists(f"{checkpoint}/{TRAINABLE}"):
        raise NotAnAdapter(f"the checkpoint of step {step} holds DeepSpeed partitions, not an adapter; export it "
                           f"(tunerun export {run.run_id} --checkpoint {step}) and serve the export")
    final = final_weights("adapter")
    for name in (ADAPTER_CONFIG, CHAT_TEMPLATE, TOKENIZER_CONFIG):  # the run's own: a checkpoint's shape is the run's
        if run.exists(f"{final}/{name}"):
            run.write_bytes(f"{target}/{name}", run.read_bytes(f"{final}/{name}"))
    # The tensors last: their presence is what says the folder is whole.
    run.write_bytes(f"{target}/{ADAPTER_FILE}", peft_names(run.read_bytes(f"{checkpoint}/{TRAINABLE}")))
    _want(run, step)
    return target


def checkpoint_adapter_folder(step: int) -> str:
    """Where step ``step``'s adapter lies in the run folder (`checkpoint_adapter` writes it there)."""
    return export_folder(checkpoint_name(step), "adapter")


def _want(run: RunFolder, step: int) -> None:
    """Say that the gateway serves this checkpoint's adapter (an engine pod's sidecar then copies it)."""
    key = f"{WANTED}/{run.run_id}~{step}"
    if not run.backend.exists(key):
        run.backend.put(key, b"")


def wanted_checkpoints(backend) -> list[tuple[str, int]]:
    """Every (run id, step) whose checkpoint adapter the gateway has been asked for, in the storage of
    ``backend``."""
    wanted = []
    for name in backend.children(WANTED):
        run_id, _, step = name.rpartition("~")
        if run_id and step.isdigit():
            wanted.append((run_id, int(step)))
    return wanted


def peft_names(safetensors: bytes) -> bytes:
    """A safetensors file with its tensors renamed from live parameter names to PEFT's saved ones. The header is
    JSON after an 8-byte little-endian length, and tensor offsets count from the end of the header, so a new header
    (padded to 8 bytes, as the format asks) in front of the same bytes is the whole change."""
    length = int.from_bytes(safetensors[:8], "little")
    header = json.loads(safetensors[8:8 + length])
    renamed = {name if name == "__metadata__" else name.replace(ADAPTER_NAME, "."): entry
               for name, entry in header.items()}
    text = json.dumps(renamed, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + safetensors[8 + length:]

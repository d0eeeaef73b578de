"""Model and data given as s3:// URIs become local folders before anything loads them.

The loading path after that is the ordinary one (`from_pretrained` on a folder, files on disk), so a model
on MinIO loads exactly like one on a shared filesystem.
"""
from __future__ import annotations

from tunerun.cluster.s3 import fetch_prefix
from tunerun.jobs.plan import ResolvedJob


def _is_s3(uri: str | None) -> bool:
    return bool(uri) and uri.startswith("s3://")


def localize_model(job: ResolvedJob) -> ResolvedJob:
    """The base model and the adapter to start from (model.adapter), each fetched when it is on S3."""
    spec = job.spec
    updates = {field: str(fetch_prefix(spec.storage, uri, "models")) for field in ("path", "adapter")
               if _is_s3(uri := getattr(spec.model, field))}
    if not updates:
        return job
    model = spec.model.model_copy(update=updates)
    return job.model_copy(update={"spec": spec.model_copy(update={"model": model})})


def localize_data(job: ResolvedJob) -> ResolvedJob:
    """s3://bucket/prefix/train.jsonl (or a prefix holding several files) → the same files in the node cache."""
    spec = job.spec
    updates = {}
    for field in ("train", "eval"):
        uri = getattr(spec.data, field)
        if not _is_s3(uri):
            continue
        parent, _, name = uri.rstrip("/").rpartition("/")
        if "." in name or any(ch in name for ch in "*?["):  # a file or a glob: fetch just what it names
            updates[field] = str(fetch_prefix(spec.storage, parent, "data", pattern=name) / name)
        else:
            updates[field] = str(fetch_prefix(spec.storage, uri, "data"))
    if not updates:
        return job
    data = spec.data.model_copy(update=updates)
    return job.model_copy(update={"spec": spec.model_copy(update={"data": data})})

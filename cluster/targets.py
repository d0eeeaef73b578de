"""Which target module serves a run: by name (``--target``) or by the ``target`` its run.json records.

Every target module has the same small surface — ``submit(job, resume)``, ``status(run)``, ``cancel(run)`` and,
where the target keeps the driver's output itself, ``logs(run, write, follow)``; those with something to show
have ``render(job)``. Modules are imported on demand: ``ray`` and ``kubernetes`` load only when used.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from tunerun.cluster.storage import RunFolder
from tunerun.jobs.errors import TargetError

MODULES = {"local": "tunerun.cluster.local", "ray": "tunerun.cluster.ray_cluster", "k8s": "tunerun.cluster.k8s",
           "slurm": "tunerun.cluster.slurm"}


def target_module(name: str) -> ModuleType:
    if name not in MODULES:
        raise TargetError(f"target '{name}' is not available yet; available: {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name])


def module_for_run(run: RunFolder) -> ModuleType:
    """The module of the target that ran ``run``. Runs of other targets get the local module, whose status and
    cancel only read the run folder (its driver pid is checked only on the host that started it)."""
    target = run.read_json("run.json").get("target", "local")
    return target_module(target if target in MODULES else "local")


def target_view(info: dict) -> str | None:
    """One line of the target's own view that ``status(run)`` added to run.json's fields, if any."""
    if isinstance(info.get("k8s"), dict) and info["k8s"].get("rayjob"):
        k8s = info["k8s"]
        if k8s.get("error"):
            return f"RayJob {k8s['namespace']}/{k8s['rayjob']}: not readable ({k8s['error']})"
        parts = [f"{key} {k8s[key]}" for key in ("deployment_status", "job_status", "reason", "message")
                 if k8s.get(key)]
        return f"RayJob {k8s['namespace']}/{k8s['rayjob']}" + (f": {', '.join(parts)}" if parts else "")
    if isinstance(info.get("slurm"), dict) and info["slurm"].get("job_id"):
        slurm = info["slurm"]
        return f"Slurm job {slurm['job_id']}: {slurm.get('state') or 'no longer known to Slurm'}"
    if isinstance(info.get("ray"), dict) and info["ray"].get("submission_id"):
        ray = info["ray"]
        if ray.get("error"):
            return f"Ray job {ray['submission_id']} at {ray['address']}: not readable ({ray['error']})"
        return f"Ray job {ray['submission_id']} at {ray['address']}: {ray.get('job_status', '?')}" + \
            (f" ({ray['message']})" if ray.get("message") else "")
    return None

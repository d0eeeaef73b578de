"""The boundaries the layout promises, checked in one place: what each module may load when it is imported.

`tunerun.jobs` and `tunerun.cluster` answer `validate`, `plan`, `render`, `status` without the training stack;
data preparation runs without torch; the trainer reaches the run folder and its record, never a target; the
service (`tunerun serve`) loads no training stack. Each module is imported in a fresh interpreter, so nothing
another test imported can hide or fake a violation.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

TRAINING_STACK = ("torch", "ray", "transformers", "deepspeed", "peft", "bitsandbytes", "mlflow", "tensorboardX")
# What the CLI also keeps out of `tunerun --help`: libraries only some commands need.
CLI_EXTRAS = ("matplotlib", "datasketch", "datasets", "kubernetes", "boto3", "llama_cpp", "fastapi", "uvicorn")
TARGET_MODULES = ("tunerun.cluster.targets", "tunerun.cluster.local", "tunerun.cluster.slurm",
                  "tunerun.cluster.k8s", "tunerun.cluster.ray_cluster")

BOUNDARIES = {
    "tunerun.jobs.cli": TRAINING_STACK + CLI_EXTRAS,
    "tunerun.jobs.loader": TRAINING_STACK,
    "tunerun.jobs.plan": TRAINING_STACK,
    "tunerun.jobs.memory": TRAINING_STACK,
    "tunerun.jobs.tracking": TRAINING_STACK,  # the validate-time check speaks MLflow's REST API itself
    # the service reaches training only through the targets and the run folder
    "tunerun.jobs.service.app": TRAINING_STACK + ("tunerun.trainer.loop", "tunerun.trainer.entrypoint"),
    "tunerun.cluster.targets": TRAINING_STACK,
    "tunerun.cluster.local": TRAINING_STACK,
    "tunerun.cluster.slurm": TRAINING_STACK,
    "tunerun.cluster.k8s": TRAINING_STACK + ("kubernetes",),
    "tunerun.cluster.ray_cluster": TRAINING_STACK,
    "tunerun.cluster.runs": TRAINING_STACK,
    "tunerun.cluster.storage": TRAINING_STACK,
    "tunerun.cluster.run_folder": TRAINING_STACK,
    "tunerun.trainer.data.pipeline": ("torch", "transformers"),
    "tunerun.trainer.data.render": ("torch", "transformers"),
    # the driver loads the training stack while Ray starts (`run_job`), not before
    "tunerun.trainer.entrypoint": TARGET_MODULES + TRAINING_STACK,
    "tunerun.trainer.loop": TARGET_MODULES,
}


def loaded_after_import(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", sorted(BOUNDARIES))
def test_importing_loads_nothing_it_must_not(module):
    loaded = loaded_after_import(module)
    forbidden = BOUNDARIES[module]
    assert sorted(name for name in loaded if name in forbidden or name.split(".")[0] in forbidden) == []


def test_the_check_sees_a_forbidden_import():
    """The check itself can fail: importing the train loop loads torch."""
    assert "torch" in loaded_after_import("tunerun.trainer.loop")

"""What the driver hands Ray Train on an embedded Ray, against what a cluster gets."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from tunerun.trainer.entrypoint import PREEMPTION_WATCHER_ENV, _embedded_ray, _start_ray, _torch_trainer

ONE_WORKER = SimpleNamespace(spec=SimpleNamespace(resources=SimpleNamespace(num_workers=1, cpus_per_worker=1)))


def _callbacks(trainer_class, **datasets) -> list[type]:
    trainer = trainer_class(lambda: None, scaling_config=ScalingConfig(num_workers=1), datasets=datasets or None)
    return [type(c) for c in trainer._create_default_callbacks()]


def test_an_embedded_ray_gets_every_default_callback_but_the_cluster_and_ray_data_ones():
    on_cluster, embedded = _callbacks(_torch_trainer(embedded=False)), _callbacks(_torch_trainer(embedded=True))
    assert PlacementGroupCleanerCallback in on_cluster and DatasetsCallback in on_cluster
    assert embedded == [c for c in on_cluster if c not in (PlacementGroupCleanerCallback, DatasetsCallback)]
    assert issubclass(_torch_trainer(embedded=True), TorchTrainer) and _torch_trainer(embedded=False) is TorchTrainer


def test_an_embedded_trainer_given_ray_datasets_still_shards_them():
    datasets = {"train": lambda: None}  # a dataset factory, called on the workers' start (made here, it starts Ray)
    assert DatasetsCallback in _callbacks(_torch_trainer(embedded=True), **datasets)


def test_an_embedded_controller_asks_no_autoscaler_for_its_workers(monkeypatch):
    """The fixed scaling policy registers the workers with Ray Data's autoscaling coordinator, a detached actor; an
    embedded Ray has no autoscaler to ask. The workers asked for stay the same."""
    given = {}
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kwargs: given.update(kwargs))
    trainer = _torch_trainer(embedded=True)(lambda: None, scaling_config=ScalingConfig(num_workers=2))
    trainer._initialize_and_run_controller(scaling_policy=None, callbacks=[])
    policy = given["scaling_policy"]
    policy.after_controller_start(train_run_context=None)
    decision = policy.make_decision_for_non_running_worker_group()
    assert decision.num_workers == 2 and policy._coordinator_client is None and given["callbacks"] == []


def test_ray_address_says_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _embedded_ray()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not _embedded_ray()


def test_a_node_that_times_out_on_a_busy_machine_is_started_again_and_its_leftovers_stopped(monkeypatch, capsys):
    """Ray gives its raylet a fixed 30 s to register, and the raylet first waits for its Python agents: at a load of
    15+ that is too short (a CI run lost a module to it). Here the first start's raylet is not found in the GCS and
    Ray's clock runs 40 s per reading, so that start fails as it does then, its GCS and raylet running; they are
    stopped and Ray started again."""
    import psutil
    import ray
    import ray._private.node as ray_node
    import ray._private.services as ray_services

    real_get_node, real_init, starts, others = ray_services.get_node, ray.init, [], []
    readings = itertools.count(1)
    slow = SimpleNamespace(monotonic=lambda: 40.0 * next(readings), sleep=time.sleep, time=time.time)

    def get_node(*args, **kwargs):
        if len(starts) == 1:
            raise RuntimeError("GCS cannot find the node")
        return real_get_node(*args, **kwargs)

    def init(**kwargs):
        starts.append(kwargs)
        if len(starts) == 1:  # meanwhile the data preparation starts its workers (sys.path, Ray's folder in it, passed)
            others.append(subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(120)  # {sys.path}"]))
        monkeypatch.setattr(ray_node, "time", slow if len(starts) == 1 else time)
        return real_init(**kwargs)

    monkeypatch.setattr(ray_services, "get_node", get_node)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="tr-ray-", dir="/tmp"))  # short: Ray's sockets
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "0")
    try:
        _start_ray(ONE_WORKER, {})
        assert ray.is_initialized() and len(starts) == 2 and starts[0] == starts[1]
        assert ray.get(ray.remote(lambda: 42).remote()) == 42
        names = [p.name() for p in psutil.Process().children(recursive=True)]
        assert sum("gcs_server" in n for n in names) == 1 and sum("raylet" in n for n in names) == 1, names
        assert others[0].poll() is None  # not Ray's: left running
    finally:
        ray.shutdown()
        for process in others:
            process.kill()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    assert "Ray's node did not start within its 30 s" in capsys.readouterr().err


def test_any_other_failure_to_start_ray_is_not_retried(monkeypatch):
    import ray

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        raise ValueError("num_cpus must be positive")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "0")
    with pytest.raises(ValueError):
        _start_ray(ONE_WORKER, {})
    assert len(calls) == 1

"""What the driver hands Ray Train on an embedded Ray, against what a cluster gets."""
from __future__ import annotations

from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from tunerun.trainer.entrypoint import _embedded_ray, _torch_trainer


def _callbacks(trainer_class) -> list[type]:
    trainer = trainer_class(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    return [type(c) for c in trainer._create_default_callbacks()]


def test_an_embedded_ray_gets_every_default_callback_but_the_placement_group_cleaner():
    on_cluster, embedded = _callbacks(_torch_trainer(embedded=False)), _callbacks(_torch_trainer(embedded=True))
    assert PlacementGroupCleanerCallback in on_cluster
    assert embedded == [c for c in on_cluster if c is not PlacementGroupCleanerCallback]
    assert issubclass(_torch_trainer(embedded=True), TorchTrainer) and _torch_trainer(embedded=False) is TorchTrainer


def test_ray_address_says_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _embedded_ray()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not _embedded_ray()

"""A full disk under the run folder, with a real tmpfs filled to the last byte (root, as in CI; else skipped): the
outcome still gets recorded (the reserved file), status says `failed (disk full)`, and what ran out is named."""
from __future__ import annotations

import errno
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tunerun.cluster import space
from tunerun.cluster.local import LocalTarget
from tunerun.cluster.run_folder import RESERVED_OUTCOME
from tunerun.cluster.runs import RunState, create_run, read_info, record_outcome, reserve_outcome_space, update_info
from tunerun.jobs.loader import load_job
from tunerun.jobs.plan import resolve

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"


@pytest.fixture
def disk(tmp_path, tmpfs):
    """A 1 MiB tmpfs, unmounted afterwards."""
    with tmpfs(tmp_path / "small", "1m") as where:
        yield where

@pytest.fixture
def run(disk, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    (tmp_path / "models" / "tiny-llama" / "config.json").write_text("{}")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "data").symlink_to(REPO / "examples" / "data")
    job = resolve(load_job(str(QUICKSTART), [f"storage.uri={disk / 'runs'}"]), run_id="r")
    return create_run(job, "local")


def fill(disk: Path) -> None:
    with (disk / "ballast").open("wb") as ballast:
        with pytest.raises(OSError) as full:
            while True:
                ballast.write(b"\0" * 65536)
                ballast.flush()
    assert full.value.errno == errno.ENOSPC


def test_on_a_full_disk_the_outcome_goes_into_the_reserved_file_and_status_reads_it(run, disk):
    reserve_outcome_space(run)
    update_info(run, state=RunState.RUNNING)
    fill(disk)
    with pytest.raises(OSError):
        update_info(run, detail="run.json cannot be rewritten now")
    record_outcome(run, RunState.FAILED, error="disk full: no space left on the test disk", error_kind="disk_full")
    assert '"state": "running"' in run.read_text("run.json")  # the disk kept the old record…
    info = read_info(run)  # …and every reader sees the outcome
    assert info.state == RunState.FAILED and info.error_kind == "disk_full" and info.state_text == "failed (disk full)"
    assert info.error == "disk full: no space left on the test disk"
    assert not [p.name for p in run.local_path().iterdir() if p.name.startswith(".run.json")]  # no temp left behind


def test_without_a_reserve_the_full_disk_error_reaches_the_caller(run, disk):
    update_info(run, state=RunState.RUNNING)
    fill(disk)
    with pytest.raises(OSError) as failed:
        record_outcome(run, RunState.FAILED, error="x", error_kind="disk_full")
    assert space.is_disk_full(failed.value)


def test_a_normal_outcome_releases_the_reserve(run):
    reserve_outcome_space(run)
    record_outcome(run, RunState.SUCCEEDED)
    assert not run.exists(RESERVED_OUTCOME) and read_info(run).state == RunState.SUCCEEDED


def test_a_driver_gone_silent_on_a_full_disk_is_failed_disk_full(run, disk, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    update_info(run, state=RunState.RUNNING, local={"pid": gone.pid, "log": str(tmp_path / "driver.log"),
                                                    "host": socket.gethostname()})
    fill(disk)
    info = LocalTarget().status(run)
    assert info.state_text == "failed (disk full)"
    assert info.error.startswith(f"disk full: the driver ended without recording an outcome, and {disk} (tmpfs)")
    assert "--resume r" in info.error


def test_a_shortage_names_the_filesystem_with_free_and_needed(disk):
    found = space.shortage([disk / "runs" / "not-yet"], needed=4 << 20)
    assert found is not None and found.filesystem == f"{disk} (tmpfs)" and found.free <= 1 << 20
    assert found.describe().startswith(f"{disk} (tmpfs) has ") and "the next checkpoint needs 4.0 MiB" in found.describe()
    assert space.shortage([disk], needed=1024) is None


def test_disk_full_is_recognised_in_what_ray_passes_on_as_text():
    shipped = RuntimeError("Training failed.\n  File ...\nOSError: [Errno 28] No space left on device: '/mnt/x/ckpt'")
    wrapped = RuntimeError("worker group failed")
    wrapped.__cause__ = shipped
    assert space.disk_full_in(wrapped) is shipped and space.full_path(shipped) == "/mnt/x/ckpt"
    assert space.disk_full_in(RuntimeError("CUDA out of memory")) is None

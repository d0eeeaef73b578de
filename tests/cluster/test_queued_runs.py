"""A queued run has no driver: neither `Target.status` nor queuing a paused run again may mistake an earlier
launch's driver, long gone, for this launch's (the service would report the job failed, driver gone, and never
start it). A finished child process stands in for that driver: its pid is real and dead."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tunerun.cluster.local import LocalTarget
from tunerun.cluster.runs import RunState, create_run, read_info, update_info


@pytest.fixture
def paused_run(job, tmp_path):
    """A run whose driver checkpointed, recorded `preempted` and exited."""
    driver = subprocess.Popen([sys.executable, "-c", "pass"])
    driver.wait()
    run = create_run(job, "local")
    update_info(run, local={"pid": driver.pid, "log": str(tmp_path / "driver.log"), "host": socket.gethostname()})
    update_info(run, state=RunState.PREEMPTED)
    return run


def test_a_queued_run_json_that_kept_a_dead_drivers_handle_reads_as_queued(paused_run):
    update_info(paused_run, state=RunState.QUEUED)  # as a tunerun that kept the handle when queuing left it
    seen = LocalTarget().status(paused_run)
    assert (seen.state, seen.error_kind) == (RunState.QUEUED, None)


def test_queuing_a_paused_run_again_drops_the_exited_drivers_handle(job, paused_run):
    create_run(job, "local", resume=True, state=RunState.QUEUED)
    assert LocalTarget().handle(read_info(paused_run)) is None
    assert LocalTarget().status(paused_run).state == RunState.QUEUED


def test_a_started_runs_dead_driver_is_still_driver_gone(paused_run):
    update_info(paused_run, state=RunState.RUNNING)  # the rule is about queued runs only
    seen = LocalTarget().status(paused_run)
    assert (seen.state, seen.error_kind) == (RunState.FAILED, "driver_gone")

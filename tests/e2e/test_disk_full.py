"""A run folder on a disk that fills up, and a driver killed outright: each ends with a message that says what
happened, a state that says so in `status` and `list`, and a way to continue.

The small disks are real tmpfs mounts (the tests run as root, as CI does; elsewhere they skip and say why).
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import driver_pid, session_pids, stopped

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"
TICKETS = REPO / "examples" / "data" / "support_tickets.jsonl"
RUN_TIMEOUT_S = 600  # a hang fails the test; no assertion depends on how fast anything is


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(disk: Path, leave: int = 0) -> None:
    """Take all but ``leave`` bytes of ``disk``, as another process would (leave=0: until it says ENOSPC)."""
    chunk = b"\0" * (1 << 16)
    with (disk / "ballast").open("ab") as ballast:
        try:
            while (room := free_bytes(disk) - leave) > 0:
                ballast.write(chunk[:room])
                ballast.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def start_run(cwd: Path, model: Path, storage: Path, run_id: str, *overrides: str) -> subprocess.Popen:
    sets = [f"model.path={model}", f"data.train={TICKETS}", f"storage.uri={storage}", "eval.max_examples=4",
            "resources.max_failures=0", *overrides]
    return subprocess.Popen([sys.executable, "-m", "tunerun.jobs.cli", "run", str(QUICKSTART),
                             *[a for s in sets for a in ("--set", s)], "--run-id", run_id], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(path: Path, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not path.exists():
        assert process is None or process.poll() is None, f"the run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def checkpoint_bytes(folder: Path) -> int:
    return sum(entry["size"] for entry in json.loads((folder / "manifest.json").read_text())["files"])


def end_session(session: int) -> None:
    for pid in session_pids(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_model_dir, tmpfs):
    """A run on a 64 MiB disk that another process fills after the first checkpoint, leaving room for the logs but
    not for the second checkpoint."""
    root = tmp_path_factory.mktemp("disk-full")
    with tmpfs(root / "small", "64m") as disk:
        process = start_run(root, tiny_model_dir, disk / "runs", "full", "training.max_steps=40",
                            "checkpoint.every_steps=10", "checkpoint.keep_last=3", "eval.every_steps=40")
        run = disk / "runs" / "full"
        first = run / "checkpoints" / "step-000010"
        wait_for(first / "manifest.json", process)
        with stopped(driver_pid(run)):
            size = checkpoint_bytes(first)
            fill(disk, leave=(1 << 20) + size // 2)  # 1 MiB for logs (the check's reserve) + half a checkpoint
        out, err = process.communicate(timeout=RUN_TIMEOUT_S)
        yield {"code": process.returncode, "out": out, "err": err, "disk": disk, "run": run, "root": root}


@pytest.mark.slow
def test_the_run_stops_before_the_checkpoint_that_would_not_fit(stopped_run, tunerun):
    err, run, disk = stopped_run["err"], stopped_run["run"], stopped_run["disk"]
    assert stopped_run["code"] == 2, (stopped_run["out"], err)
    assert "Traceback" not in stopped_run["out"] + err
    assert "disk full:" in err and f"{disk} (tmpfs)" in err  # which filesystem
    assert " free, the next checkpoint needs " in err and "step 20" in err  # free vs needed, and when
    assert str(run / "checkpoints" / "step-000010") in err  # the last complete checkpoint
    assert "--resume full" in err
    assert not (run / "checkpoints" / "step-000020").exists()  # nothing half-written
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "failed" and info["error_kind"] == "disk_full"
    status = tunerun("status", "full", "--storage", str(disk / "runs"), cwd=stopped_run["root"])
    assert status.returncode == 0 and "state failed (disk full)" in status.stdout


@pytest.mark.slow
def test_the_printed_resume_command_finishes_the_run_after_the_folder_moved(stopped_run, tunerun):
    larger = stopped_run["root"] / "larger-disk" / "runs"
    shutil.copytree(stopped_run["run"], larger / "full")
    printed = stopped_run["err"].split("continue with: ", 1)[1].split(" (with --storage", 1)[0]
    words = shlex.split(printed)
    assert words[:2] == ["tunerun", "run"]
    resumed = tunerun(*words[1:], "--storage", str(larger), cwd=stopped_run["root"], timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
    run = larger / "full"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [10]
    steps = [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps[steps.index(10) + 1] == 11 and steps[-1] == 40  # the step count continues where it stopped
    assert json.loads((run / "run.json").read_text())["state"] == "succeeded"


@pytest.mark.slow
def test_a_disk_filled_from_outside_mid_run_is_reported_as_disk_full(tmp_path, tiny_model_dir, tunerun, tmpfs):
    with tmpfs(tmp_path / "small", "64m") as disk:
        process = start_run(tmp_path, tiny_model_dir, disk / "runs", "filled", "training.max_steps=100000",
                            "checkpoint.every_steps=5", "eval.every_steps=100000")
        run = disk / "runs" / "filled"
        wait_for(run / "checkpoints" / "step-000005" / "manifest.json", process)
        fill(disk)  # everything: the next write of the run meets ENOSPC, wherever it happens
        try:
            out, err = process.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            end_session(driver_pid(run))
        assert process.returncode == 2, (out, err)
        assert "disk full:" in err and str(disk) in err and "Traceback" not in out + err
        assert "without recording an outcome" not in err
        assert str(run / "checkpoints" / "step-000005") in err and "--resume filled" in err
        status = tunerun("status", "filled", "--storage", str(disk / "runs"), cwd=tmp_path)
        listed = tunerun("list", "--storage", str(disk / "runs"), cwd=tmp_path)
        assert "state failed (disk full)" in status.stdout, status.stdout + status.stderr
        assert "failed (disk full)" in listed.stdout, listed.stdout + listed.stderr


@pytest.mark.slow
def test_kill_9_of_tunerun_run_leaves_the_driver_training_and_a_killed_driver_shows_failed(tmp_path, tiny_model_dir,
                                                                                           tunerun):
    storage = tmp_path / "runs"
    process = start_run(tmp_path, tiny_model_dir, storage, "k9", "training.max_steps=100000",
                        "checkpoint.every_steps=5", "eval.every_steps=100000")
    run = storage / "k9"
    header = [process.stdout.readline(), process.stdout.readline()]
    assert f"tunerun logs k9 -f --storage {storage}" in header[1], header
    assert f"tunerun cancel k9 --storage {storage}" in header[1], header
    wait_for(run / "checkpoints" / "step-000005" / "manifest.json", process)
    session = driver_pid(run)
    try:
        process.kill()  # kill -9 of `tunerun run`: its driver has a session of its own
        process.wait()
        seen = len((run / "metrics.jsonl").read_text().splitlines())
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len((run / "metrics.jsonl").read_text().splitlines()) <= seen + 2:
            assert time.monotonic() < deadline, "the driver stopped training when `tunerun run` was killed"
            time.sleep(0.2)
        os.kill(session, signal.SIGKILL)  # now the driver itself, as the OOM killer would
        deadline = time.monotonic() + 60
        while session in session_pids(session):  # gone, or a zombie nobody reaped yet
            assert time.monotonic() < deadline, "SIGKILL did not end the driver"
            time.sleep(0.1)
    finally:
        end_session(session)
    status = tunerun("status", "k9", "--storage", str(storage), cwd=tmp_path)
    listed = tunerun("list", "--storage", str(storage), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "state failed (driver gone)" in status.stdout
    assert f"last complete checkpoint {run / 'checkpoints' / 'step-0000'}" in status.stdout
    assert "--resume k9" in status.stdout
    assert "\nlog    " in status.stdout  # the last lines of the driver's log
    assert "failed (driver gone)" in listed.stdout

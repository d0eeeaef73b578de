"""Runs that go wrong: the user sees one message and the right exit code, the run folder keeps what was done."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import driver_pid, session_pids

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"


def start(tmp_path: Path, tiny_model_dir: Path, data: Path, *overrides: str, run_id: str = "bad") -> subprocess.Popen:
    sets = [f"model.path={tiny_model_dir}", f"data.train={data}", f"storage.uri={tmp_path / 'runs'}", *overrides]
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "tunerun.jobs.cli", "run", str(QUICKSTART), *args,
                             "--run-id", run_id], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def test_malformed_jsonl_line_is_a_user_error_with_its_line_number(tmp_path, tiny_model_dir):
    data = tmp_path / "tickets.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data.write_text("\n".join([good] * 5 + ["{not json"] + [good] * 4) + "\n")
    code, out, err = finish(start(tmp_path, tiny_model_dir, data))
    assert code == 2, (out, err)
    assert "tickets.jsonl:6" in err and "max_bad_fraction" in err
    assert "Traceback" not in out + err
    info = json.loads((tmp_path / "runs" / "bad" / "run.json").read_text())
    assert info["state"] == "failed" and info["error_kind"] == "user"


def test_empty_dataset_is_refused_before_anything_starts(tmp_path, tiny_model_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    code, out, err = finish(start(tmp_path, tiny_model_dir, data))
    assert code == 2 and "holds no records" in err and "data.train" in err
    assert "Traceback" not in out + err
    assert not (tmp_path / "runs").exists()  # refused at validation: no run folder was made


def test_internal_failure_exits_1_and_leaves_the_traceback_in_the_run_log(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for item in tiny_model_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    # max_failures=0: Ray Train would otherwise restart the worker group 3 times (the default) on this
    # deterministic failure, each restart loading the same broken weights again (~15 s each on 2 cores).
    code, out, err = finish(start(tmp_path, broken, REPO / "examples/data/support_tickets.jsonl",
                                  "resources.max_failures=0"))
    assert code == 1, (out, err)
    assert "Traceback" not in out + err
    log = tmp_path / "runs" / "bad" / "logs" / "driver.log"
    assert str(log) in err and "Traceback" in log.read_text()


@pytest.mark.slow
def test_worker_killed_mid_run_is_replaced_and_training_continues(tmp_path, tiny_model_dir):
    """Ray Train fault tolerance: kill -9 one worker after the first checkpoint; the worker group restarts,
    resumes from the newest complete checkpoint and the run still succeeds."""
    process = start(tmp_path, tiny_model_dir, REPO / "examples/data/support_tickets.jsonl",
                    "training.max_steps=40", "checkpoint.every_steps=5", "checkpoint.keep_last=10",
                    "eval.every_steps=40", "resources.max_failures=2", run_id="ft")
    run = tmp_path / "runs" / "ft"
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step-000005" / "manifest.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    victims = _train_worker_pids(driver_pid(run))
    assert victims, "no RayTrainWorker process found in the run's session"
    os.kill(victims[0], signal.SIGKILL)
    code, out, err = finish(process)
    assert code == 0, (out, err, (run / "logs" / "driver.log").read_text()[-3000:])
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] >= 5
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[-1] == 40


def _train_worker_pids(session: int) -> list[int]:
    """This run's Ray Train workers: those of its driver's session, not another test's run beside it."""
    out = subprocess.run(["ps", "-eo", "pid,sid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if "RayTrainWorker" in line and "ps -eo" not in line and int(line.split()[1]) == session]


@pytest.mark.slow
def test_cancel_stops_every_ray_process_and_keeps_checkpoints(tmp_path, tiny_model_dir):
    sets = [f"model.path={tiny_model_dir}", f"storage.uri={tmp_path / 'runs'}", "training.max_steps=100000",
            "checkpoint.every_steps=5",
            f"data.train={REPO / 'examples/data/support_tickets.jsonl'}"]
    cli = [sys.executable, "-m", "tunerun.jobs.cli"]
    submitted = subprocess.run([*cli, "submit", str(QUICKSTART), *[a for s in sets for a in ("--set", s)],
                                "--run-id", "cx"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    run = tmp_path / "runs" / "cx"
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step-000005" / "manifest.json").exists():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    session = driver_pid(run)
    cancelled = subprocess.run([*cli, "cancel", "cx", "--storage", str(tmp_path / "runs")], capture_output=True,
                               text=True, timeout=60)
    assert cancelled.returncode == 0 and "cancelled cx" in cancelled.stdout
    deadline = time.monotonic() + 3  # polled: the same 3 s bound as a fixed sleep, no longer than needed
    while session_pids(session) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_pids(session) == []  # raylet, GCS and the train workers are all gone
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "cancelled" and not info.get("error")
    from tunerun.cluster.run_folder import RunFolder
    from tunerun.trainer.checkpoint import latest_complete

    assert latest_complete(RunFolder(str(tmp_path / "runs"), "cx"), tmp_path / "scratch")[0] is not None

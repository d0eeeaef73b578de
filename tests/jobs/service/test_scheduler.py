"""The local target's queue in this process, with no training: `tunerun.cluster.local.start` is replaced by a
launch that records the run as started (pending, as the real one does before its driver records `running`) or
fails the way a full disk or a bug does. Checked: at most ``max_concurrent_runs`` start, longest queued first,
and a finished run frees its slot; one job's failure fails or delays that job only, the jobs behind
it still start, claims a crashed server left do not block the queue, and the thread keeps ticking.
"""
from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest
import yaml
from service_calls import TICKETS, client, upload

from tunerun.cluster import local
from tunerun.cluster.runs import RunState, create_run, read_info, update_info
from tunerun.jobs.service.config import ProjectSettings
from tunerun.jobs.service.scheduler import Scheduler, fair_order

FULL = OSError(errno.ENOSPC, "No space left on device")
HOUR = 3600.0


class Launches:
    """Stands in for `local.start`: each call takes the next outcome (an exception to raise, or None: start)."""

    def __init__(self, *outcomes):
        self.outcomes, self.started = list(outcomes), []

    def __call__(self, job, resume=False, launch=None):
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        run = create_run(job, "local", resume, launch=launch)
        self.started.append(job.run_id)
        return run, Driver()


class Driver:
    pid = 4242

    def poll(self):
        return None


@pytest.fixture
def jobs(app, keys):
    """Creates n queued jobs of project acme, oldest first: their ids."""
    found = upload(app, keys["acme"], "acme", TICKETS)
    api = client(app, keys["acme"])
    return lambda n: [api.fine_tuning.jobs.create(model="support-tiny", training_file=found.id).id for _ in range(n)]


@pytest.fixture
def service(app):
    return app.state.service


def launched(monkeypatch, *outcomes) -> Launches:
    launches = Launches(*outcomes)
    monkeypatch.setattr(local, "start", launches)
    return launches


def state(service, job_id):
    return read_info(service.jobs.store.open(job_id))


def set_run_json(service, job_id, **fields) -> None:
    """Fields of run.json set by hand, as another server or an older launch left them."""
    path = service.jobs.store.open(job_id).local_path("run.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_only_max_concurrent_runs_start_longest_queued_first_and_a_finished_one_frees_its_slot(service, jobs,
                                                                                             monkeypatch):
    first, second, third = jobs(3)
    now = time.time()
    # queued since (set by hand, not by the order of creation): the second longest, then the third, then the first
    for job_id, waited in ((first, 10.0), (second, 30.0), (third, 20.0)):
        set_run_json(service, job_id, updated_at=now - waited)
    service.jobs.config = service.jobs.config.model_copy(update={"max_concurrent_runs": 2})
    launches = launched(monkeypatch)
    queue = Scheduler(service.jobs)
    queue.tick()
    assert launches.started == [second, third] and state(service, first).state == RunState.QUEUED
    queue.tick()  # both slots are taken (pending, then running): nothing more starts
    set_run_json(service, second, state="running")
    queue.tick()
    assert launches.started == [second, third] and state(service, first).state == RunState.QUEUED
    set_run_json(service, second, state="succeeded", finished_at=time.time())
    queue.tick()
    assert launches.started == [second, third, first]
    assert queue.health()["last_error"] is None


def test_fair_order_serves_the_project_with_fewest_running_first_and_each_within_its_own_limit():
    """Ordering only (no jobs): acme's backlog of 4 does not hold back ops or ml, and ml's limit of 1 holds."""
    queued = [("acme", 1.0, "acme-1"), ("acme", 2.0, "acme-2"), ("acme", 3.0, "acme-3"), ("acme", 4.0, "acme-4"),
              ("ops", 5.0, "ops-1"), ("ml", 6.0, "ml-1"), ("ml", 7.0, "ml-2"), ("ops", 8.0, "ops-2")]
    caps = {"ml": 1}.get
    order = fair_order(queued, {}, 8, lambda p: caps(p, 8), lambda job: True)
    assert order == ["acme-1", "ops-1", "ml-1", "acme-2", "ops-2", "acme-3", "acme-4"]  # ml-2: ml's limit is 1
    # ops already runs 2: acme, then ml catch up first; the server's 4 slots less the 2 running leave 2
    assert fair_order(queued, {"ops": 2}, 4, lambda p: 8, lambda job: True) == ["acme-1", "ml-1"]
    # a job that does not take its slot (its launch failed) leaves the pick to the next in line
    assert fair_order(queued, {}, 2, lambda p: 8, lambda job: job != "acme-1") == ["acme-2", "ops-1"]
    # one slot, ticks apart: projects take turns although acme's whole backlog was queued first
    served, order = {}, []
    for _ in range(4):
        left = [item for item in queued if item[2] not in order]
        order += fair_order(left, {}, 1, lambda p: 8, lambda job: True, served)
    assert order == ["acme-1", "ops-1", "ml-1", "acme-2"]


def test_a_project_with_a_backlog_does_not_hold_back_another_project(service, jobs, app, keys, monkeypatch):
    """Through the server's API and its scheduler: acme queued 3 jobs before ops queued 1; with 2 slots the
    second goes to ops, and acme's per-project limit of 1 keeps its next job queued while a slot is free."""
    acme = jobs(3)
    found = upload(app, keys["other"], "other", TICKETS)
    [other] = [client(app, keys["other"]).fine_tuning.jobs.create(model="support-tiny", training_file=found.id).id]
    service.jobs.config = service.jobs.config.model_copy(update={"max_concurrent_runs": 2})
    launches = launched(monkeypatch)
    queue = Scheduler(service.jobs)
    queue.tick()
    assert launches.started == [acme[0], other]  # oldest-first alone would have started acme's first two

    service.jobs.config = service.jobs.config.model_copy(update={
        "max_concurrent_runs": 3, "projects": {"acme": ProjectSettings(max_concurrent_runs=1)}})
    queue.tick()
    assert launches.started == [acme[0], other]  # a free slot, but acme has its one job running
    set_run_json(service, acme[0], state="succeeded", finished_at=time.time())
    queue.tick()
    assert launches.started == [acme[0], other, acme[1]]
    api = client(app, keys["acme"])
    assert [api.fine_tuning.jobs.retrieve(j).status for j in acme[1:]] == ["queued", "queued"]
    assert state(service, acme[2]).state == RunState.QUEUED


def test_a_full_disk_at_launch_is_tried_again_on_later_ticks_and_logged_once(service, jobs, monkeypatch, caplog):
    [job_id] = jobs(1)
    launches = launched(monkeypatch, FULL, FULL, FULL)
    queue = Scheduler(service.jobs)
    for _ in range(3):
        queue.tick()
    assert launches.started == [] and state(service, job_id).state == RunState.QUEUED
    assert queue.health()["last_error"] == f"job {job_id}: not started yet, trying again: OSError: " \
                                          "[Errno 28] No space left on device"
    queue.tick()  # space was freed
    assert launches.started == [job_id] and queue.health()["last_error"] is None
    said = [r for r in caplog.records if r.name == "tunerun.serve" and "No space left" in r.getMessage()]
    assert len(said) == 1 and job_id in said[0].getMessage()


def test_a_launch_that_raises_fails_that_job_and_the_job_behind_it_starts(service, jobs, monkeypatch, app, keys):
    first, second = jobs(2)
    launches = launched(monkeypatch, RuntimeError("the launcher broke"))
    Scheduler(service.jobs).tick()
    assert launches.started == [second]
    failed = client(app, keys["acme"]).fine_tuning.jobs.retrieve(first)
    assert failed.status == "failed" and failed.error.code == "internal_error"
    assert failed.error.message == "the server could not start the job: RuntimeError: the launcher broke"


def test_a_job_yaml_from_another_tunerun_fails_that_job_saying_so(service, jobs, monkeypatch):
    first, second = jobs(2)
    run = service.jobs.store.open(first)
    written = yaml.safe_load(run.read_text("job.yaml"))
    run.write_text("job.yaml", yaml.safe_dump({**written, "tunerun_version": "9.1.0", "sharding": {"stages": 2}}))
    launches = launched(monkeypatch)
    Scheduler(service.jobs).tick()
    info = state(service, first)
    assert info.state == RunState.FAILED and info.error_kind == "internal"
    assert "job.yaml was written by tunerun 9.1.0 and this server runs tunerun" in info.error
    assert "which cannot read it (" in info.error and "sharding" in info.error
    assert launches.started == [second]


def test_an_empty_claim_left_by_a_crashed_server_does_not_block_the_queue(service, jobs, monkeypatch):
    [job_id] = jobs(1)
    run = service.jobs.store.open(job_id)
    # the claim a server made before the disk filled: created, never written, then the server died
    claim = run.local_path(f"control/launch-{read_info(run).updated_at!r}")
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_bytes(b"")
    long_ago = time.time() - HOUR  # older than any launch takes
    os.utime(claim, (long_ago, long_ago))
    launches = launched(monkeypatch)
    queue = Scheduler(service.jobs)
    queue.tick()
    assert launches.started == [job_id]
    holder = json.loads(claim.with_name(claim.name + "-1").read_text())
    assert holder["pid"] == os.getpid() and claim.read_bytes() == b""  # the next generation; nothing deleted


def test_a_fresh_empty_claim_is_waited_for_without_holding_the_slot(service, jobs, monkeypatch):
    first, second = jobs(2)
    run = service.jobs.store.open(first)
    claim = run.local_path(f"control/launch-{read_info(run).updated_at!r}")
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_bytes(b"")
    launches = launched(monkeypatch)
    Scheduler(service.jobs).tick()
    assert launches.started == [second]  # nobody is starting the first: its slot goes to the next


def test_a_live_claim_of_another_server_holds_the_slot_and_a_dead_servers_does_not(service, jobs, monkeypatch):
    first, second = jobs(2)
    run = service.jobs.store.open(first)
    base = f"control/launch-{read_info(run).updated_at!r}"
    run.claim(base, {"host": "other", "pid": 1, "token": "theirs", "time": time.time()})
    launches = launched(monkeypatch)
    queue = Scheduler(service.jobs)
    queue.tick()
    assert launches.started == []  # the other server starts the first job; the slot is taken
    run.write_json(base, {"host": "other", "pid": 1, "token": "theirs", "time": time.time() - HOUR})
    queue.tick()
    assert launches.started == [first]


def test_a_launch_that_stopped_before_its_driver_was_recorded_is_queued_again(service, jobs, monkeypatch):
    first, second = jobs(2)
    run = service.jobs.store.open(first)
    update_info(run, state=RunState.PENDING)  # claimed and dequeued, then the server died before the driver ran
    record = run.read_json("run.json")
    run.write_json("run.json", {**record, "updated_at": time.time() - HOUR})
    launches = launched(monkeypatch)
    queue = Scheduler(service.jobs)
    queue.tick()
    assert state(service, first).state == RunState.QUEUED and launches.started == [second]
    assert run.read_jsonl("events.jsonl")[-1]["event"] == "run_queued"


def test_an_unreadable_run_json_does_not_stop_the_others(service, jobs, monkeypatch):
    first, second = jobs(2)
    service.jobs.store.open(first).write_text("run.json", "{\"state\": \"queu")  # cut off by a full disk
    launches = launched(monkeypatch)
    Scheduler(service.jobs).tick()
    assert launches.started == [second]


def test_the_thread_survives_any_error_and_health_says_so(service, jobs, monkeypatch):
    first, second = jobs(2)
    launches = launched(monkeypatch, RuntimeError("the launcher broke"), FULL)
    queue = Scheduler(service.jobs, poll_s=0.02)
    listing, calls = service.jobs.store.run_ids, []

    def run_ids():  # the first tick meets a bug outside any one job
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug in listing")
        return listing()

    monkeypatch.setattr(service.jobs.store, "run_ids", run_ids)
    queue.start()
    try:
        deadline = time.monotonic() + 10
        while launches.started != [second] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert launches.started == [second] and state(service, first).state == RunState.FAILED
        health = queue.health()
        assert health["scheduler"] == "running" and health["last_tick_age_s"] < 5
    finally:
        queue.stop()
        queue._thread.join(5)
    assert queue.health()["scheduler"] == "stopped"


def test_health_says_stalled_when_a_tick_hangs_and_off_for_other_targets(service, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(service.jobs.store, "run_ids", lambda: release.wait(10) and [])
    queue = Scheduler(service.jobs, poll_s=0.01)
    queue.stalled_after_s = 0.2
    queue.start()
    try:
        time.sleep(0.5)
        assert queue.health()["scheduler"] == "stalled"
    finally:
        queue.stop()
        release.set()
        queue._thread.join(5)
    service.jobs.config = service.jobs.config.model_copy(update={"target": "slurm"})
    assert Scheduler(service.jobs).health() == {"scheduler": "off", "last_tick_age_s": None, "last_error": None}


@pytest.fixture
def runs_on_a_small_disk(tmp_path, tmpfs):
    """./runs (the service's storage) on a 4 MiB tmpfs, mounted before the app exists; root only, as CI runs."""
    with tmpfs(tmp_path / "runs", "4m") as disk:
        yield disk

def test_a_real_full_disk_stops_no_scheduler_and_the_job_starts_once_there_is_room(runs_on_a_small_disk, service,
                                                                                 jobs, monkeypatch):
    [job_id] = jobs(1)
    launches = launched(monkeypatch)
    ballast = runs_on_a_small_disk / "ballast"
    with ballast.open("wb") as taking:
        try:
            while True:
                taking.write(b"\0" * 65536)
                taking.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    queue = Scheduler(service.jobs, poll_s=0.02)
    queue.start()
    try:
        deadline = time.monotonic() + 10
        while "No space left" not in (queue.health()["last_error"] or "") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "No space left" in queue.health()["last_error"] and launches.started == []
        claims = (runs_on_a_small_disk / job_id / "control").glob("*")
        assert all(claim.stat().st_size > 0 for claim in claims)  # no empty claim left to hold up a restart
        ballast.unlink()
        while launches.started != [job_id] and time.monotonic() < deadline + 10:
            time.sleep(0.02)
        assert launches.started == [job_id] and queue.health()["scheduler"] == "running"
    finally:
        queue.stop()

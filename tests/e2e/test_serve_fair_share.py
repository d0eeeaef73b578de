"""Fair share for real: `tunerun serve` as a process with one slot (``max_concurrent_runs: 1``), two projects, the
scheduler launching real drivers. Project acme queues a backlog behind its running job, globex queues one job
after it; when acme's job ends the slot goes to globex, not to acme's older backlog (oldest-first would have).
Nothing needs to finish training: every job is cancelled once the order is seen.
"""
from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
from serve_process import WAIT_S, serve_models, stop_drivers

REPO = Path(__file__).resolve().parents[2]
TICKETS = REPO / "examples" / "data" / "support_tickets.jsonl"
pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path, tiny_model_dir, free_port, tunerun):
    # steps enough that a job trains until it is cancelled
    server, keys = serve_models(tmp_path, tiny_model_dir, {"support-tiny": 400}, free_port(), tunerun)
    apis = {project: openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0,
                                   timeout=60) for project, key in keys.items()}
    yield apis
    server.stop()
    stop_drivers(tmp_path / "runs")


def create(api: openai.OpenAI) -> str:
    found = api.files.create(file=TICKETS.open("rb"), purpose="fine-tune")
    deadline = time.monotonic() + 120
    while found.status == "uploaded" and time.monotonic() < deadline:
        time.sleep(0.5)
        found = api.files.retrieve(found.id)
    return api.fine_tuning.jobs.create(model="support-tiny", training_file=found.id).id


def run_state(api: openai.OpenAI, job_id: str) -> str:
    return api.fine_tuning.jobs.retrieve(job_id).tunerun["state"]


def wait_state(api: openai.OpenAI, job_id: str, states: set[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while (state := run_state(api, job_id)) not in states:
        assert time.monotonic() < deadline and state not in ("failed", "cancelled"), f"{job_id}: {state}"
        time.sleep(0.5)


def test_a_project_queued_behind_anothers_backlog_gets_the_next_slot(server):
    acme, globex = server["acme"], server["globex"]
    first = create(acme)
    wait_state(acme, first, {"running"})
    backlog = [create(acme), create(acme)]
    theirs = create(globex)  # queued after all of acme's
    acme.fine_tuning.jobs.cancel(first)
    deadline = time.monotonic() + 120  # the scheduler ticks every second
    while (states := [run_state(globex, theirs)] + [run_state(acme, job) for job in backlog]) == ["queued"] * 3:
        assert time.monotonic() < deadline, "no job started after the slot freed"
        time.sleep(0.5)
    assert states[0] in ("pending", "running") and states[1:] == ["queued", "queued"], states
    for api, job in ((globex, theirs), *((acme, job) for job in backlog)):
        api.fine_tuning.jobs.cancel(job)

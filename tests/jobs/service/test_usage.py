"""Per-project usage from the run folders: jobs by status, trained tokens, worker-hours and GPU-hours (no training).

Jobs are created through the API (their job.yaml, run.json and service.json are the service's own); what a driver
then writes — its launches' events, the metrics rows with ``tokens_seen``, run.json's state — is written here
through the run-folder owner's API, at known times.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from loopback import serving
from service_calls import TEMPLATE, TICKETS, client, upload

from tunerun.cluster.run_folder import EVENTS, SERVICE_RECORD, RunFolder, TrainRow, append_metrics
from tunerun.cluster.runs import update_info
from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.files import FileStore
from tunerun.jobs.service.fine_tuning import JobService
from tunerun.jobs.service.usage import usage_by_project

DAY, HOUR = 86400.0, 3600.0
GPU_TEMPLATE = TEMPLATE.replace("workers_per_node: 2}", "workers_per_node: 2, gpus_per_worker: 1}")


@pytest.fixture
def served(served, tmp_path, stub_model_dir):
    """The shared catalog, plus a model whose spec trains on 2 workers of 1 GPU each."""
    (tmp_path / "support-gpu.yaml").write_text(GPU_TEMPLATE.replace("MODEL", str(stub_model_dir)))
    config = tmp_path / "server.yaml"
    config.write_text(config.read_text().replace("models:\n", "models:\n  support-gpu: {job: support-gpu.yaml}\n"))
    return load_server_config(config)


def launch(run: RunFolder, start: float, end: float | None, outcome: str | None, tokens: list[tuple[float, int]]):
    """One launch of ``run`` as its driver records it: run_started, metrics rows, and its outcome (None: still
    running, or ended without a word)."""
    update_info(run, state="running", started_at=start)
    run.append_jsonl(EVENTS, {"time": start, "event": "run_started", "pid": 1})
    for step, (at, seen) in enumerate(tokens, start=1):
        append_metrics(run, TrainRow(step=step, time=at, loss=1.0, tokens_seen=seen))
    if outcome is not None:
        run.append_jsonl(EVENTS, {"time": end, "event": f"run_{outcome}"})
    if end is not None:
        update_info(run, state=outcome or "failed", finished_at=end)


def created(run: RunFolder, at: float) -> None:
    """The job as if it had been created at ``at`` (service.json is the record of when)."""
    run.write_json(SERVICE_RECORD, {**run.read_json(SERVICE_RECORD), "created_at": at})


@pytest.fixture
def ledger(app, keys, served):
    """acme: a CPU job that ran 20 days ago, a GPU job paused 3 days ago and running again, a queued job; other:
    a job whose driver died without a word 2 days ago. The moment it was written, for exact windows."""
    now = time.time()
    acme, other = client(app, keys["acme"]), client(app, keys["other"])
    acme_file, other_file = upload(app, keys["acme"], "acme", TICKETS).id, upload(app, keys["other"], "other",
                                                                               TICKETS).id
    storage = served.config.storage

    def job(api, model: str, file_id: str) -> RunFolder:
        return RunFolder(storage, api.fine_tuning.jobs.create(model=model, training_file=file_id).id)

    cpu, gpu, waiting = (job(acme, "support-tiny", acme_file), job(acme, "support-gpu", acme_file),
                         job(acme, "support-tiny", acme_file))
    died = job(other, "support-tiny", other_file)
    created(cpu, now - 20 * DAY - 60)
    launch(cpu, now - 20 * DAY, now - 20 * DAY + 1800, "succeeded", [(now - 20 * DAY + 600, 1000),
                                                                      (now - 20 * DAY + 1700, 5000)])
    created(gpu, now - 3 * DAY - 60)
    launch(gpu, now - 3 * DAY, now - 3 * DAY + HOUR, "preempted", [(now - 3 * DAY + 1000, 2000),
                                                                    (now - 3 * DAY + 3500, 4000)])
    launch(gpu, now - 1800, None, None, [(now - 600, 6000)])
    created(died, now - 2 * DAY - 60)
    launch(died, now - 2 * DAY, now - 2 * DAY + HOUR, None, [(now - 2 * DAY + 100, 700)])
    return now, {"cpu": cpu, "gpu": gpu, "waiting": waiting, "died": died}


def fresh_jobs(served) -> JobService:
    """The jobs as a server (or `tunerun serve usage`) that starts now reads them."""
    return JobService(served, FileStore(served.config.storage))


def test_usage_per_project_counts_launches_tokens_and_gpus_within_the_window(ledger, served):
    now, _ = ledger
    ever = {name: u.to_json() for name, u in usage_by_project(fresh_jobs(served), now=now).items()}
    assert ever == {
        "acme": {"project": "acme", "jobs": {"queued": 1, "running": 1, "succeeded": 1}, "jobs_total": 3,
                 "trained_tokens": 5000 + 6000, "worker_hours": 1.0 + 3.0, "gpu_hours": 3.0},
        "other": {"project": "other", "jobs": {"failed": 1}, "jobs_total": 1, "trained_tokens": 700,
                  "worker_hours": 2.0, "gpu_hours": 0.0}}
    week = usage_by_project(fresh_jobs(served), since=now - 7 * DAY, now=now)["acme"]
    assert (week.jobs, week.trained_tokens, week.worker_hours, week.gpu_hours) == (
        {"queued": 1, "running": 1}, 6000, 3.0, 3.0)  # the job of 20 days ago is not in it
    # From the middle of the GPU job's first launch: half of it, the tokens trained after that moment
    cut = usage_by_project(fresh_jobs(served), project="acme", since=now - 3 * DAY + 1800, now=now)["acme"]
    assert (cut.trained_tokens, cut.worker_hours, cut.gpu_hours) == (6000 - 2000, 2.0, 2.0)
    assert usage_by_project(fresh_jobs(served), project="initech", now=now)["initech"].to_json()["jobs_total"] == 0


def test_the_api_and_the_dashboard_panel_show_only_the_signed_in_projects_figures(ledger, served, keys, free_port):
    now, _ = ledger
    app = create_app(served)  # a server started after the jobs ran
    with serving(app, free_port()) as url:
        def usage(key: str, **params) -> dict:
            answer = httpx.get(f"{url}/v1/usage", params=params, headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 200, answer.text
            return answer.json()

        mine = usage(keys["acme"], since=int(now - 7 * DAY))
        assert (mine["object"], mine["project"], mine["jobs_total"], mine["trained_tokens"]) == (
            "tunerun.usage", "acme", 2, 6000)
        assert mine["worker_hours"] == pytest.approx(3.0, abs=0.05)
        theirs = usage(keys["other"])
        assert (theirs["project"], theirs["trained_tokens"], theirs["worker_hours"]) == ("other", 700, 2.0)
        assert httpx.get(f"{url}/v1/usage").status_code == 401
        panel = dashboard_panel(url, keys["acme"])
    assert panel["jobs"] == "3 (1 queued, 1 running, 1 succeeded)"
    assert panel["trained-tokens"].replace(",", "").replace("\u202f", "") == "11000"
    # the running launch counts on while the page loads: a few seconds of 2 workers
    assert float(panel["worker-hours"]) == pytest.approx(4.0, abs=0.05)
    assert float(panel["gpu-hours"]) == pytest.approx(3.0, abs=0.05)
    assert "other" not in panel["title"] and "acme" in panel["title"]
    app.state.service.validator.shutdown()


def dashboard_panel(url: str, key: str) -> dict[str, str]:
    """The usage panel of the jobs page as Chromium shows it to a browser signed in with ``key``."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (scripts/install-system-deps installs it)")
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_context(base_url=url, locale="en-US").new_page()
            page.goto("/")
            page.fill("#api-key", key)
            page.click("#sign-in")
            page.wait_for_selector("#usage dd[data-figure='gpu-hours']")
            figures = {node.get_attribute("data-figure"): node.inner_text()
                       for node in page.query_selector_all("#usage dd")}
            return {**figures, "title": page.inner_text("#usage-panel h2")}
        finally:
            browser.close()


def test_cli_usage_prints_every_project_as_a_table_or_json(ledger, served, tunerun):
    listed = tunerun("serve", "usage", "--config", "server.yaml", "--since", "30d", "--json", cwd=Path.cwd(),
                     timeout=120)
    assert listed.returncode == 0, listed.stderr
    found = {p["project"]: p for p in json.loads(listed.stdout)["projects"]}
    assert sorted(found) == ["acme", "other"]
    assert (found["acme"]["trained_tokens"], found["other"]["trained_tokens"]) == (11000, 700)
    assert found["acme"]["gpu_hours"] == pytest.approx(3.0, abs=0.05)
    table = tunerun("serve", "usage", "--config", "server.yaml", "--since", "7d", cwd=Path.cwd(), timeout=120)
    assert table.returncode == 0, table.stderr
    acme_row = next(line for line in table.stdout.splitlines() if line.split()[:1] == ["acme"])
    # the running launch counts on while the command starts: 3 worker-hours and GPU-hours, and a few seconds
    assert "1 queued, 1 running" in acme_row and "6,000" in acme_row and len(re.findall(r" 3\.0\d ", acme_row)) == 2

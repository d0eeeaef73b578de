"""The dashboard in a real browser: Debian's chromium driven by Playwright, against `tunerun serve` training jobs.

One server for the module (jobs one at a time on the embedded local Ray, the tiny model). The main flow, shared
by the tests: sign in, upload the bundled tickets on the New-job page, start a job, pause it from its page (the
progress bar holds mid-way), resume it, follow it to `succeeded`. Then the job page's charts and tables, a second
job cancelled from its button, another project's view, a wrong key, a non-JSONL upload, and HTML in metadata that
stays text. Screenshots of the jobs page and the job page go to the test's folder (and, with
``TUNERUN_SCREENSHOTS=DIR``, to DIR: that is how the README's pictures are made).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import openai
import pytest
from browser import launch_chromium
from browser import sign_in as browser_sign_in
from serve_process import WAIT_S, serve_models, stop_drivers

playwright = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")

REPO = Path(__file__).resolve().parents[2]
TICKETS = REPO / "examples" / "data" / "support_tickets.jsonl"
STEPS = 24
MS = 1000


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir, free_port, tunerun):
    root = tmp_path_factory.mktemp("dashboard")
    server, keys = serve_models(root, tiny_model_dir, {"support-tiny": STEPS}, free_port(), tunerun)
    yield root, f"http://127.0.0.1:{server.port}", keys
    server.stop()
    stop_drivers(root / "runs")


@pytest.fixture(scope="module")
def chromium():
    yield from launch_chromium()


def api(service, project: str = "acme") -> openai.OpenAI:
    _, url, keys = service
    return openai.OpenAI(base_url=f"{url}/v1", api_key=keys[project], max_retries=0, timeout=60)


def sign_in(chromium, service, key: str):
    return browser_sign_in(chromium, service[1], key)


def status_of(page, where: str) -> str:
    return page.get_attribute(f"{where} .status", "data-status")


def wait_status(page, where: str, wanted: set[str]) -> str:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status = page.locator(f"{where} .status").first
        if status.count() and (seen := status.get_attribute("data-status")) in wanted:
            return seen
        page.wait_for_timeout(500)
    pytest.fail(f"{where} never showed {wanted}; last: {page.locator(where).inner_text()}")


def start_job_from_form(page, suffix: str, epochs: str = "") -> str:
    page.goto("/new")
    page.set_input_files("#file", str(TICKETS))
    page.click("#upload")
    page.wait_for_selector("#file-status", timeout=120 * MS)
    assert page.inner_text("#file-status") == "processed"
    page.select_option("#model", "support-tiny")
    page.fill("#suffix", suffix)
    if epochs:
        page.fill("#epochs", epochs)
    page.click("#start")
    page.wait_for_url("**/jobs/ftjob-*", timeout=60 * MS)
    return page.url.rsplit("/", 1)[-1]


def progress_of(page, job_id: str) -> tuple[float, str]:
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    return float(row.locator("progress").get_attribute("data-value")), row.locator(".progress-text").inner_text()


@pytest.fixture(scope="module")
def trained(chromium, service, tmp_path_factory):
    """The main flow, recorded: what the New-job page said, the progress seen, the job page when done."""
    shots = tmp_path_factory.mktemp("screenshots")
    page = sign_in(chromium, service, service[2]["acme"])
    seen = {}
    page.goto("/new")
    page.set_input_files("#file", str(TICKETS))
    page.click("#upload")
    page.wait_for_selector("#file-status", timeout=120 * MS)
    seen["validation"] = {r.locator("th").inner_text(): r.locator("td").inner_text()
                          for r in page.locator("#validation-counts tr").all()}
    job_id = start_job_from_form(page, "refunds-v1")
    # pause it from its page once it trains: it stops at its next checkpoint, the bar holds where it stopped
    page.wait_for_selector("#pause:not([hidden])", timeout=WAIT_S * MS)
    page.click("#pause")
    wait_status(page, "#job-meta", {"paused"})
    page.goto("/")
    page.wait_for_selector(f'tr[data-job-id="{job_id}"]')
    seen["paused"] = progress_of(page, job_id)
    page.goto(f"/jobs/{job_id}")
    page.wait_for_selector("#resume:not([hidden])")
    page.click("#resume")
    page.goto("/")  # the jobs page follows it without a reload
    seen["statuses"] = set()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and "succeeded" not in seen["statuses"]:
        seen["statuses"].add(status_of(page, f'tr[data-job-id="{job_id}"]'))
        page.wait_for_timeout(400)
    seen["done"] = progress_of(page, job_id)
    page.screenshot(path=str(shots / "dashboard-jobs.png"))
    page.goto(f"/jobs/{job_id}")
    page.wait_for_selector("#report:not([hidden])", timeout=60 * MS)
    seen["report_title"] = page.frame_locator("#report").locator("h1").inner_text(timeout=60 * MS)
    page.wait_for_selector('#base-vs-tuned tr[data-metric="exact_match"]')
    # a full-page capture does not repaint the framed report: grow the window to the page instead
    page.set_viewport_size({"width": 1360, "height": page.evaluate("() => document.body.scrollHeight")})
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "dashboard-job.png"))
    page.set_viewport_size({"width": 1360, "height": 900})
    if os.environ.get("TUNERUN_SCREENSHOTS"):
        target = Path(os.environ["TUNERUN_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy(shot, target / shot.name)
    return page, job_id, seen, shots


@pytest.mark.slow
def test_a_job_started_from_the_upload_form_is_followed_to_succeeded(trained, service):
    page, job_id, seen, shots = trained
    assert seen["validation"]["Records"] == "600" and int(seen["validation"]["Kept"]) < 600
    assert int(seen["validation"]["PII masked: email"]) > 0
    value, text = seen["paused"]
    stopped_at = int(re.match(rf"step (\d+)/{STEPS}", text).group(1))  # e.g. "step 8/24 · 310 tok/s"
    assert 0 < stopped_at < STEPS and value == pytest.approx(stopped_at / STEPS, abs=1e-4)
    assert {"running", "succeeded"} <= seen["statuses"]  # watched, not reloaded
    assert seen["done"][0] == 1.0 and seen["done"][1].startswith(f"step {STEPS}/{STEPS}")
    job = api(service).fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded" and job.user_provided_suffix == "refunds-v1"  # the API says the same
    assert seen["report_title"] == job_id  # the run's report.html, framed in its page
    assert (shots / "dashboard-jobs.png").stat().st_size > 10_000 and (shots / "dashboard-job.png").exists()


@pytest.mark.slow
def test_the_job_page_draws_curves_and_fills_base_vs_tuned(trained):
    page, job_id, _, _ = trained
    points = page.evaluate("""() => Object.fromEntries(['chart-loss', 'chart-lr', 'chart-eval'].map(id =>
        [id, Chart.getChart(id).data.datasets.map(d => d.data.length)]))""")
    assert points["chart-loss"] == [STEPS] and points["chart-lr"] == [STEPS]
    assert points["chart-eval"][0] == STEPS // 4  # held-out loss at every evaluation
    drawn = page.evaluate("() => { const c = document.getElementById('chart-loss'); "
                          "return c.width > 0 && c.getContext('2d').getImageData(0, 0, c.width, c.height)"
                          ".data.some(v => v !== 0); }")
    assert drawn
    cells = page.locator('#base-vs-tuned tr[data-metric="loss"] td').all_inner_texts()
    base, tuned = float(cells[0]), float(cells[1])
    assert tuned < base  # it learned
    examples = page.locator("#examples tbody tr")
    assert examples.count() > 0 and all(examples.first.locator("td").all_inner_texts())
    assert int(page.inner_text("#data-counts tr:first-child td")) == 600
    assert page.locator("#checkpoints tbody tr").count() >= 1
    assert page.locator("#events li").count() > 5
    assert page.is_hidden("#pause") and page.is_hidden("#resume") and page.is_hidden("#cancel")  # it is over
    link = page.locator("#artifacts a").first
    assert "adapter" in link.inner_text()
    download = page.request.get(link.get_attribute("href"))  # the page's own session
    assert download.status == 200 and len(download.body()) > 10_000


@pytest.mark.slow
def test_a_second_job_is_cancelled_from_its_button(trained, service):
    page, first_id, _, _ = trained
    job_id = start_job_from_form(page, "long", epochs="30")
    page.wait_for_selector("#cancel:not([hidden])")
    wait_status(page, "#job-meta", {"running"})
    page.click("#cancel")
    wait_status(page, "#job-meta", {"cancelled"})
    assert api(service).fine_tuning.jobs.retrieve(job_id).status == "cancelled"
    page.goto("/")
    page.wait_for_selector(f'tr[data-job-id="{job_id}"]')
    assert status_of(page, f'tr[data-job-id="{job_id}"]') == "cancelled"
    # and the two compare: same file, same split, so the best is marked
    for job in (first_id, job_id):
        page.check(f'tr[data-job-id="{job}"] input[type=checkbox]')
    page.click("#compare-selected")
    page.wait_for_selector("#comparison thead th a")
    assert page.locator("#comparison thead th a").count() == 2
    assert page.locator('#comparison td[data-best="true"]').count() >= 1
    assert page.locator("#compare-warning").is_hidden()


@pytest.mark.slow
def test_another_project_sees_neither_job(trained, chromium, service):
    _, job_id, _, _ = trained
    page = sign_in(chromium, service, service[2]["globex"])
    page.wait_for_selector("#no-jobs:not([hidden])")
    assert page.locator("#jobs tbody tr").count() == 0 and page.inner_text("#project") == "globex"
    answer = page.goto(f"/jobs/{job_id}")
    assert answer.status == 404 and "has no job" in page.inner_text("#message")
    assert "refunds-v1" not in page.content()


@pytest.mark.slow
def test_a_wrong_key_cannot_sign_in(chromium, service):
    page = sign_in(chromium, service, "tr-123456789abc-" + "A" * 43)
    assert "not valid" in page.inner_text("#signin-error") and page.url.endswith("/signin")
    assert page.goto("/").url.endswith("/signin")


@pytest.mark.slow
def test_a_file_that_is_not_jsonl_is_refused_on_the_page(trained, tmp_path):
    page, *_ = trained
    notes = tmp_path / "notes.jsonl"
    notes.write_text("Dear team, here are the tickets\n")
    page.goto("/new")
    page.set_input_files("#file", str(notes))
    page.click("#upload")
    page.wait_for_selector("#upload-error:not([hidden])")
    assert "not JSONL" in page.inner_text("#upload-error") and page.is_disabled("#start")


@pytest.mark.slow
def test_a_file_of_preference_pairs_starts_a_dpo_job_from_the_form(trained, service):
    """The method follows the uploaded file; β goes where OpenAI's API puts it. The job is cancelled at once: DPO
    training itself is tests/e2e/test_preference.py."""
    page, *_ = trained
    page.goto("/new")
    page.set_input_files("#file", str(REPO / "examples" / "data" / "support_preferences.jsonl"))
    page.click("#upload")
    page.wait_for_selector("#file-status", timeout=120 * MS)
    assert page.inner_text("#file-status") == "processed"
    assert page.input_value("#method") == "dpo" and page.is_visible("#beta")
    page.select_option("#model", "support-tiny")
    page.fill("#beta", "0.2")
    page.click("#start")
    page.wait_for_url("**/jobs/ftjob-*", timeout=60 * MS)
    client = api(service)
    job = client.fine_tuning.jobs.retrieve(page.url.rsplit("/", 1)[-1])
    client.fine_tuning.jobs.cancel(job.id)
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    page.goto("/new")  # a chat file goes back to supervised fine-tuning
    page.set_input_files("#file", str(TICKETS))
    page.click("#upload")
    page.wait_for_selector("#file-status", timeout=120 * MS)
    assert page.input_value("#method") == "supervised" and not page.is_visible("#beta")


@pytest.mark.slow
def test_html_in_metadata_is_shown_as_text_and_never_runs(trained, service):
    page, first_id, _, _ = trained
    client = api(service)
    training_file = client.fine_tuning.jobs.retrieve(first_id).training_file
    planted = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    job = client.fine_tuning.jobs.create(model="support-tiny", training_file=training_file,
                                         metadata={"note": planted})
    client.fine_tuning.jobs.cancel(job.id)  # queued: nothing trains
    page.goto(f"/jobs/{job.id}")
    page.wait_for_selector("#facts dd")
    assert planted in page.inner_text("#facts")
    assert page.locator("#facts img, #facts script").count() == 0
    assert page.evaluate("() => window.__pwned") is None

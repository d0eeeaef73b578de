"""The dashboard's sessions, CSRF and walls over HTTP, against the app in this process (no browser, no training).

What a browser does on top (the scripts, the charts, the buttons) is tests/e2e/test_dashboard.py.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_calls import TICKETS, client, upload

from tunerun.jobs.service.keys import KeyStore
from tunerun.jobs.service.sessions import SESSION_COOKIE, SIGNIN_COOKIE


def browser(app) -> TestClient:
    return TestClient(app, base_url="http://testserver", follow_redirects=False)


def signed_in(app, key: str) -> tuple[TestClient, str]:
    """A browser signed in with ``key`` and the CSRF token its pages carry."""
    visitor = browser(app)
    form = visitor.get("/signin")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    answer = visitor.post("/signin", data={"api_key": key, "csrf_token": token})
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    page = visitor.get("/")
    return visitor, re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text).group(1)


def test_signing_in_sets_a_hardened_cookie_that_holds_no_key(app, keys):
    visitor = browser(app)
    assert visitor.get("/").headers["location"] == "/signin"  # no session: to the sign-in page
    form = visitor.get("/signin")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    answer = visitor.post("/signin", data={"api_key": keys["acme"], "csrf_token": token})
    cookie = next(h for h in answer.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert keys["acme"] not in cookie and keys["acme"].split("-", 2)[2] not in cookie
    assert answer.headers["location"] == "/"
    page = visitor.get("/")
    assert page.status_code == 200 and 'id="project">acme<' in page.text
    assert keys["acme"] not in page.text


def test_a_wrong_key_or_a_foreign_form_cannot_sign_in(app, keys):
    visitor = browser(app)
    form = visitor.get("/signin")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    wrong = visitor.post("/signin", data={"api_key": keys["acme"][:-2] + "xx", "csrf_token": token})
    assert wrong.status_code == 401 and "not valid" in wrong.text
    assert not any(h.startswith(SESSION_COOKIE) for h in wrong.headers.get_list("set-cookie"))
    foreign = browser(app)  # a page on another site posting to ours: it has no sign-in cookie to match
    forged = foreign.post("/signin", data={"api_key": keys["acme"], "csrf_token": token})
    assert forged.status_code == 400 and "another site" in forged.text
    missing = visitor.post("/signin", data={"api_key": keys["acme"]})
    assert missing.status_code == 400
    assert SESSION_COOKIE not in visitor.cookies and SESSION_COOKIE not in foreign.cookies


def test_the_api_takes_the_cookie_but_changes_nothing_without_the_csrf_token(app, keys):
    visitor, csrf = signed_in(app, keys["acme"])
    assert visitor.get("/v1/fine_tuning/jobs").json()["data"] == []
    body = {"purpose": "fine-tune"}
    refused = visitor.post("/v1/files", data=body, files={"file": ("t.jsonl", TICKETS.read_bytes())})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    foreign = visitor.post("/v1/files", data=body, files={"file": ("t.jsonl", TICKETS.read_bytes())},
                           headers={"x-csrf-token": "0" * 32})
    assert foreign.status_code == 403
    assert client(app, keys["acme"]).files.list().data == []  # nothing was stored
    stored = visitor.post("/v1/files", data=body, files={"file": ("t.jsonl", TICKETS.read_bytes())},
                          headers={"x-csrf-token": csrf})
    assert stored.status_code == 200 and stored.json()["filename"] == "t.jsonl"


def test_an_expired_session_or_a_revoked_key_signs_out(app, keys, served):
    service = app.state.service
    store = KeyStore(served.config.storage)
    record = store.record_of(keys["acme"])
    expired = browser(app)
    expired.cookies.set(SESSION_COOKIE, service.sessions.issue(record, now=time.time() - 9 * 3600))
    answer = expired.get("/")
    assert answer.status_code == 303 and answer.headers["location"] == "/signin?expired=1"
    assert "session has ended" in expired.get("/signin?expired=1").text
    assert expired.get("/v1/fine_tuning/jobs").status_code == 401
    tampered = browser(app)
    value = service.sessions.issue(record)
    tampered.cookies.set(SESSION_COOKIE, value.replace(value[3], "A" if value[3] != "A" else "B", 1))
    assert tampered.get("/v1/fine_tuning/jobs").status_code == 401
    visitor, _ = signed_in(app, keys["acme"])
    store.revoke(record.key_id)
    assert visitor.get("/").headers["location"] == "/signin?expired=1"


def test_signing_out_clears_the_cookie(app, keys):
    visitor, csrf = signed_in(app, keys["acme"])
    assert visitor.post("/signout", data={"csrf_token": "nope"}).status_code == 400  # a forged sign-out form
    answer = visitor.post("/signout", data={"csrf_token": csrf})
    assert answer.status_code == 303 and answer.headers["location"] == "/signin?signed_out=1"
    cleared = next(h for h in answer.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE))
    assert "Max-Age=0" in cleared or "expires=Thu, 01 Jan 1970" in cleared
    assert SESSION_COOKIE not in visitor.cookies
    assert visitor.get("/").headers["location"] == "/signin"


def test_another_projects_job_in_the_url_is_a_plain_not_found(app, keys):
    found = upload(app, keys["acme"], "acme", TICKETS)
    job = client(app, keys["acme"]).fine_tuning.jobs.create(model="support-tiny", training_file=found.id,
                                                            metadata={"secret-plan": "acquire globex"})
    other, _ = signed_in(app, keys["other"])
    page = other.get(f"/jobs/{job.id}")
    assert page.status_code == 404 and f"has no job {job.id}" in page.text and "acquire" not in page.text
    made_up = other.get("/jobs/ftjob-000000000000000000000000")
    assert made_up.status_code == 404 and page.text.replace(job.id, "X") == made_up.text.replace(made_up.url.path[6:], "X")
    for path in ("", "/evaluation", "/artifacts", "/report"):
        assert other.get(f"/v1/fine_tuning/jobs/{job.id}{path}").status_code == 404
    acme, _ = signed_in(app, keys["acme"])
    assert acme.get(f"/jobs/{job.id}").status_code == 200


def test_pages_carry_a_strict_policy_and_no_inline_script(app, keys):
    visitor, _ = signed_in(app, keys["acme"])
    for path in ("/", "/new", "/compare", "/signin"):
        page = visitor.get(path)
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), path  # every script is a file from here
        assert "http://" not in page.text and "https://" not in page.text  # no CDN: the cluster is offline
    assert visitor.get("/static/vendor/chart.umd.min.js").status_code == 200


def test_an_upload_reports_what_cleaning_will_do(app, keys):
    found = upload(app, keys["acme"], "acme", TICKETS)
    cleaning = client(app, keys["acme"]).files.retrieve(found.id).model_extra["tunerun"]["cleaning"]
    assert cleaning["records_read"] == 600 and cleaning["kept"] < 600
    assert cleaning["records_read"] - cleaning["kept"] == sum(cleaning[k] for k in (
        "malformed", "empty", "duplicates", "near_duplicates", "fuzzy_duplicates"))
    assert cleaning["pii_masked"]["email"] > 0  # the bundled tickets hold addresses


def test_artifacts_download_as_one_tar_and_jobs_compare(app, keys):
    acme = client(app, keys["acme"])
    found = upload(app, keys["acme"], "acme", TICKETS)
    first = acme.fine_tuning.jobs.create(model="support-tiny", training_file=found.id, suffix="v1")
    second = acme.fine_tuning.jobs.create(model="support-tiny", training_file=found.id, suffix="v2")
    adapter = Path("runs") / first.id / "final" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 3_000_000)  # over one streamed chunk
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    visitor, _ = signed_in(app, keys["acme"])
    listed = visitor.get(f"/v1/fine_tuning/jobs/{first.id}/artifacts").json()["data"]
    assert [(a["id"], a["kind"], a["files"]) for a in listed] == [("final-adapter", "adapter", 2)]
    download = visitor.get(listed[0]["download_url"])
    assert download.status_code == 200 and "attachment" in download.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        members = {m.name: m.size for m in tar.getmembers()}
    top = f"{first.id}-final-adapter"
    assert members == {f"{top}/adapter_config.json": 8, f"{top}/adapter_model.safetensors": 3_000_000}
    assert visitor.get(f"/v1/fine_tuning/jobs/{first.id}/artifacts/final-model").status_code == 404
    compared = visitor.get(f"/v1/fine_tuning/compare?job_ids={first.id},{second.id}").json()
    assert [r["suffix"] for r in compared["runs"]] == ["v1", "v2"] and compared["warnings"] == []
    assert "_service" not in json.dumps(compared)  # where uploads are kept is the server's business
    assert visitor.get(f"/v1/fine_tuning/compare?job_ids={first.id}").status_code == 400


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs/{job}/evaluation", "/v1/fine_tuning/jobs/{job}/data_report"])
def test_outcomes_of_a_queued_job_say_they_are_not_there_yet(app, keys, path):
    found = upload(app, keys["acme"], "acme", TICKETS)
    job = client(app, keys["acme"]).fine_tuning.jobs.create(model="support-tiny", training_file=found.id)
    answer = TestClient(app).get(path.format(job=job.id), headers={"authorization": f"Bearer {keys['acme']}"})
    if path.endswith("evaluation"):
        assert answer.status_code == 200 and answer.json()["base"] is None and answer.json()["examples"] == []
    else:
        assert answer.status_code == 404 and "not prepared its data yet" in answer.json()["error"]["message"]


def test_the_signin_cookie_is_scoped_to_the_form(app):
    form = browser(app).get("/signin")
    cookie = next(h for h in form.headers.get_list("set-cookie") if h.startswith(SIGNIN_COOKIE))
    assert "Path=/signin" in cookie and "HttpOnly" in cookie

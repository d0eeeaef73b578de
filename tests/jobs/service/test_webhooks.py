"""Webhooks: a job that ends is an OpenAI event, signed per Standard Webhooks, delivered at least once to the
endpoints the admin allowed, from an outbox in the storage.

Each delivery goes over a real socket to a receiver on loopback, which checks it as a user's receiver would: with
the official `openai` client's ``webhooks.unwrap``. Jobs end without training: a queued job is cancelled through
the API, and success or failure is written into run.json by hand, as a driver would. Passes of the delivery thread
are run by the test (`Webhooks.tick`), except in the test that runs the server's own thread.
"""
from __future__ import annotations

import base64
import json
import secrets
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from fastapi.testclient import TestClient
from service_calls import TEMPLATE, TICKETS, client, upload

from tunerun.jobs.errors import SpecError
from tunerun.jobs.service import webhooks
from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.keys import KeyStore
from tunerun.jobs.service.webhooks import OUTBOX, DeliveryError, checked_address, job_event, parse_secret

SERVER = """
storage: {{uri: ./runs}}
models:
  support-tiny: {{job: support.yaml}}
webhooks:
  allow: [{allow}]
  endpoints:
    acme: [{{url: "{url}", secret_env: ACME_WEBHOOK_SECRET}}]
  retry: {{attempts: {attempts}, first_delay_s: 0.1}}
  poll_s: 0.1
  timeout_s: 2
"""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Receiver:
    """A webhook receiver on loopback: answers each POST with the next of ``answers`` (then 200), and keeps what
    came (path, headers, body)."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.answers: list[int] = []
        self.received: list[tuple[str, dict, bytes]] = []
        self.times: list[float] = []  # when each came (monotonic)
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                receiver.times.append(time.monotonic())
                status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                self.send_header("content-length", "0")
                self.end_headers()
                receiver.arrived.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/hooks/acme"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, secret: str) -> list:
        """Every delivery, verified and parsed by the official client (it raises on a bad signature)."""
        verifier = openai.OpenAI(api_key="unused")
        return [verifier.webhooks.unwrap(body, headers, secret=secret) for _, headers, body in self.received]


@pytest.fixture
def receiver():
    found = Receiver()
    yield found
    found.server.shutdown()


@pytest.fixture
def secret(monkeypatch):
    value = new_secret()
    monkeypatch.setenv("ACME_WEBHOOK_SECRET", value)
    return value


def write_server(tmp_path, stub_model_dir, receiver, attempts=3, url=None, allow=None, more="") -> None:
    (tmp_path / "support.yaml").write_text(TEMPLATE.replace("MODEL", str(stub_model_dir)))
    (tmp_path / "server.yaml").write_text(SERVER.format(allow=allow or receiver.url.rsplit("/hooks", 1)[0],
                                                        url=url or receiver.url, attempts=attempts) + more)


@pytest.fixture
def served(tmp_path, stub_model_dir, monkeypatch, receiver, secret):
    monkeypatch.chdir(tmp_path)
    write_server(tmp_path, stub_model_dir, receiver)
    return load_server_config(tmp_path / "server.yaml")


@pytest.fixture
def service(app):
    return app.state.service


@pytest.fixture
def jobs(app, keys):
    """Creates n queued jobs of ``project``: their ids."""
    files = {}

    def make(n: int, project: str = "acme") -> list[str]:
        if project not in files:
            files[project] = upload(app, keys[project], project, TICKETS).id
        api = client(app, keys[project])
        return [api.fine_tuning.jobs.create(model="support-tiny", training_file=files[project]).id
                for _ in range(n)]
    return make


def end(service, job_id: str, state: str, at: float | None = None) -> None:
    """run.json as the driver leaves it when the job ends."""
    path = service.jobs.store.open(job_id).local_path("run.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "state": state,
                                "finished_at": time.time() if at is None else at}))


def delivered(service, receiver, count: int, timeout_s: float = 10.0) -> None:
    """Passes of the delivery thread until ``count`` deliveries arrived."""
    deadline = time.monotonic() + timeout_s
    while len(receiver.received) < count:
        assert time.monotonic() < deadline, f"{len(receiver.received)} of {count} deliveries arrived"
        service.webhooks.tick()
        time.sleep(0.05)


# ── events ──────────────────────────────────────────────────────────────────────────────────────────────────

def test_each_way_a_job_ends_is_its_openai_event_signed_for_unwrap_and_sent_once(service, jobs, app, keys, receiver,
                                                                                 secret):
    succeeded, failed, cancelled = jobs(3)
    other = jobs(1, project="other")[0]  # a project without endpoints: nothing is sent for it
    end(service, succeeded, "succeeded")
    end(service, failed, "failed")
    client(app, keys["acme"]).fine_tuning.jobs.cancel(cancelled)
    end(service, other, "succeeded")
    delivered(service, receiver, 3)
    for _ in range(3):
        service.webhooks.tick()  # nothing more: one event per job and type
    assert len(receiver.received) == 3 and {path for path, _, _ in receiver.received} == {"/hooks/acme"}
    events = {event.data.id: event for event in receiver.events(secret)}
    assert {job: events[job].type for job in events} == {
        succeeded: "fine_tuning.job.succeeded", failed: "fine_tuning.job.failed",
        cancelled: "fine_tuning.job.cancelled"}
    for (_, headers, body), event in zip(receiver.received, receiver.events(secret)):
        assert headers["webhook-id"] == event.id and event.id.startswith("evt_") and event.object == "event"
        assert json.loads(body) == {"id": event.id, "object": "event", "created_at": event.created_at,
                                    "type": event.type, "data": {"id": event.data.id}}
    assert service.webhooks.pending() == []


def test_a_job_that_ended_before_its_project_had_an_endpoint_sends_nothing(service, jobs, receiver):
    (job,) = jobs(1)
    end(service, job, "succeeded", at=time.time() - 3600)
    for _ in range(3):
        service.webhooks.tick()
    assert receiver.received == [] and service.webhooks.pending() == []


def test_a_receiver_that_fails_gets_the_event_after_retries_and_a_redirect_is_not_followed(service, jobs, receiver,
                                                                                           secret):
    receiver.answers = [500, 302]
    (job,) = jobs(1)
    end(service, job, "failed")
    delivered(service, receiver, 3)
    paths = [path for path, _, _ in receiver.received]
    assert paths == ["/hooks/acme"] * 3  # the redirect's target was never called
    ids = {headers["webhook-id"] for _, headers, _ in receiver.received}
    assert len(ids) == 1 and [e.type for e in receiver.events(secret)] == ["fine_tuning.job.failed"] * 3
    (event_id,) = ids
    marks = service.webhooks.backend.list(f"{OUTBOX}/acme/{event_id}")
    assert any(key.endswith(".delivered") for key in marks) and service.webhooks.pending() == []


def test_the_waits_between_attempts_grow_and_the_last_failure_gives_up(service, jobs, receiver, caplog):
    receiver.answers = [503] * 10
    (job,) = jobs(1)
    end(service, job, "succeeded")
    deadline = time.monotonic() + 10
    while service.webhooks.pending() or not receiver.received:
        assert time.monotonic() < deadline
        service.webhooks.tick()
        time.sleep(0.02)
    assert len(receiver.received) == 3  # attempts: 3, then no more
    service.webhooks.tick()
    assert len(receiver.received) == 3 and "given up after 3 attempts" in caplog.text
    first, second = (later - earlier for earlier, later in zip(receiver.times, receiver.times[1:]))
    assert 0.1 <= first < 0.4 <= second  # first_delay_s 0.1, then 4 times as long
    (event_id,) = {headers["webhook-id"] for _, headers, _ in receiver.received}
    stored = service.webhooks.backend.list(f"{OUTBOX}/acme/{event_id}")
    assert any(key.endswith(".failed") for key in stored)


def test_a_restarted_server_delivers_what_the_outbox_holds(served, service, jobs, receiver, secret):
    receiver.answers = [500]
    (job,) = jobs(1)
    end(service, job, "cancelled")
    delivered(service, receiver, 1)  # the first attempt failed; this server stops here
    restarted = create_app(served).state.service
    restarted.validator.shutdown()  # uploads are not this test's business
    delivered(restarted, receiver, 2)
    for _ in range(3):
        restarted.webhooks.tick()
    events = receiver.events(secret)
    assert len(events) == 2 and {e.type for e in events} == {"fine_tuning.job.cancelled"} and events[1].data.id == job
    assert restarted.webhooks.pending() == []


def test_the_server_runs_deliveries_in_its_own_thread(app, jobs, keys, receiver, secret):
    (job,) = jobs(1)
    client(app, keys["acme"]).fine_tuning.jobs.cancel(job)  # before the scheduler could start it
    with TestClient(app):  # the app's lifespan: its scheduler and its webhooks thread run
        assert receiver.arrived.wait(10)
    (event,) = receiver.events(secret)
    assert event.type == "fine_tuning.job.cancelled" and event.data.id == job



# ── endpoints a project manages: OpenAI's /v1/webhook_endpoints ────────────────────────────────────────────

def test_a_project_makes_lists_and_deletes_its_endpoints_through_the_openai_client(served, service, app, jobs, keys,
                                                                                  receiver):
    other = client(app, keys["other"])
    made = other.webhooks.create(name="ci", url=f"http://127.0.0.1:{receiver.port}/hooks/other",
                                 event_types=["fine_tuning.job.succeeded"])
    assert made.signing_secret.startswith("whsec_") and parse_secret(made.signing_secret) is not None
    shown = other.webhooks.retrieve(made.id)
    assert shown.url == made.url and shown.event_types == ["fine_tuning.job.succeeded"]
    assert made.signing_secret not in json.dumps(shown.to_dict())  # shown once, at creation
    assert [e.id for e in other.webhooks.list()] == [made.id]
    restarted = create_app(served).state.service  # a restarted server knows it: it lives in the storage
    restarted.validator.shutdown()
    assert [e.id for e in restarted.webhooks.of_project("other")] == [made.id]

    succeeded, failed = jobs(2, project="other")
    end(service, succeeded, "succeeded")
    end(service, failed, "failed")  # not among the endpoint's event types
    delivered(service, receiver, 1)
    for _ in range(3):
        service.webhooks.tick()
    (event,) = receiver.events(made.signing_secret)
    assert event.type == "fine_tuning.job.succeeded" and event.data.id == succeeded
    assert receiver.received[0][0] == "/hooks/other"

    assert other.webhooks.delete(made.id).deleted is True
    assert list(other.webhooks.list()) == []
    (later,) = jobs(1, project="other")
    end(service, later, "succeeded")
    for _ in range(3):
        service.webhooks.tick()
    assert len(receiver.received) == 1


def test_another_projects_endpoint_is_not_found_and_the_admins_cannot_be_deleted(app, keys, receiver):
    other, acme = client(app, keys["other"]), client(app, keys["acme"])
    made = other.webhooks.create(name="ci", url=receiver.url, event_types=["fine_tuning.job.failed"])
    with pytest.raises(openai.NotFoundError):
        acme.webhooks.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        acme.webhooks.delete(made.id)
    (configured,) = acme.webhooks.list()
    assert configured.url == receiver.url and configured.to_dict()["tunerun"] == {"managed_by": "server.yaml"}
    with pytest.raises(openai.BadRequestError) as refused:
        acme.webhooks.delete(configured.id)
    assert "platform team" in refused.value.message
    assert [e.id for e in other.webhooks.list()] == [made.id]


@pytest.mark.parametrize("url, event_types, param, fragment", [
    ("https://evil.example.net/hook", ["fine_tuning.job.failed"], "url", "not an address this server may call"),
    ("http://169.254.169.254/latest/meta-data", ["fine_tuning.job.failed"], "url", "not an address this server"),
    ("ftp://127.0.0.1/hook", ["fine_tuning.job.failed"], "url", "only http:// and https://"),
    ("http://127.0.0.1:{port}/hook", ["batch.completed"], "event_types", "sends only fine_tuning.job"),
])
def test_an_endpoint_the_admin_did_not_allow_is_refused_naming_the_parameter(app, keys, receiver, url, event_types,
                                                                             param, fragment):
    other = client(app, keys["other"])
    with pytest.raises(openai.BadRequestError) as refused:
        other.webhooks.create(name="x", url=url.format(port=receiver.port), event_types=event_types)
    assert refused.value.body["param"] == param and fragment in refused.value.message
    assert list(other.webhooks.list()) == []


def self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 that signs itself (cert.pem, key.pem): trusted only where it is the CA bundle."""
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize("trusted", [True, False])
def test_an_https_receiver_is_called_only_with_a_certificate_the_server_trusts(tmp_path, stub_model_dir, monkeypatch,
                                                                              secret, trusted, caplog):
    cert, key = self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    receiver = Receiver(tls)
    try:
        monkeypatch.chdir(tmp_path)
        write_server(tmp_path, stub_model_dir, receiver, attempts=1,
                     more=f"  ca_bundle: {cert}\n" if trusted else "")
        app = create_app(load_server_config(tmp_path / "server.yaml"))
        service = app.state.service
        key = KeyStore(service.served.config.storage).create("acme")[1]
        api = client(app, key)
        job = api.fine_tuning.jobs.create(model="support-tiny", training_file=upload(app, key, "acme", TICKETS).id).id
        api.fine_tuning.jobs.cancel(job)
        for _ in range(3):
            service.webhooks.tick()
        service.validator.shutdown()
    finally:
        receiver.server.shutdown()
    if trusted:
        (event,) = receiver.events(secret)
        assert event.data.id == job and event.type == "fine_tuning.job.cancelled"
    else:
        assert receiver.received == [] and "CERTIFICATE_VERIFY_FAILED" in caplog.text

# ── signatures ──────────────────────────────────────────────────────────────────────────────────────────────

def test_a_signed_event_passes_unwrap_and_a_changed_body_or_another_secret_does_not():
    secret = new_secret()
    event = job_event("ftjob-" + "a" * 24, "fine_tuning.job.succeeded", time.time())
    body = webhooks.body_of(event)
    headers = webhooks.signed_headers(parse_secret(secret), event["id"], body)
    verifier = openai.OpenAI(api_key="unused")
    assert verifier.webhooks.unwrap(body, headers, secret=secret).data.id == "ftjob-" + "a" * 24
    with pytest.raises(openai.InvalidWebhookSignatureError):
        verifier.webhooks.unwrap(body.replace(b"succeeded", b"failed"), headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        verifier.webhooks.unwrap(body, headers, secret=new_secret())
    stale = webhooks.signed_headers(parse_secret(secret), event["id"], body, now=time.time() - 3600)
    with pytest.raises(openai.InvalidWebhookSignatureError):  # a replay an hour later
        verifier.webhooks.unwrap(body, stale, secret=secret)


def test_the_event_id_is_one_per_job_and_type():
    job = "ftjob-" + "b" * 24
    assert webhooks.event_id(job, "fine_tuning.job.failed") == webhooks.event_id(job, "fine_tuning.job.failed")
    assert webhooks.event_id(job, "fine_tuning.job.failed") != webhooks.event_id(job, "fine_tuning.job.cancelled")


# Fixed values, no random key: every pytest-xdist worker must collect the same test ids.
@pytest.mark.parametrize("text", ["", "whsec_", "secret", "whsec_" + base64.b64encode(b"short").decode(),
                                  "whsec_not*base64", base64.b64encode(bytes(range(32))).decode()])
def test_a_value_that_is_not_a_whsec_secret_of_24_to_64_bytes_is_refused(text):
    assert parse_secret(text) is None


# ── what the admin allows ───────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("url, allow, fragment", [
    ("https://evil.example.net/x", "http://127.0.0.1:{port}", "is not under webhooks.allow"),
    ("http://127.0.0.1.evil.net:{port}/x", "http://127.0.0.1:{port}", "is not under webhooks.allow"),
    ("http://127.0.0.1:{port}.evil.net/x", "http://127.0.0.1:{port}", "has a port that is not a number"),
    ("http://127.0.0.1:{port}/hooks-other", "http://127.0.0.1:{port}/hooks", "is not under webhooks.allow"),
    ("https://127.0.0.1:{port}/hooks", "http://127.0.0.1:{port}", "is not under webhooks.allow"),
    ("file:///etc/passwd", "http://127.0.0.1:{port}", "only http:// and https://"),
    ("http://user:pw@127.0.0.1:{port}/x", "http://127.0.0.1:{port}", "must not hold credentials"),
    ("http://127.0.0.1:{port}/hooks/../admin", "http://127.0.0.1:{port}/hooks", "'..' path segments"),
])
def test_a_url_the_admin_did_not_allow_is_refused_at_load_naming_the_field(tmp_path, stub_model_dir, receiver, url,
                                                                           allow, fragment):
    write_server(tmp_path, stub_model_dir, receiver, url=url.format(port=receiver.port),
                 allow=allow.format(port=receiver.port))
    with pytest.raises(SpecError) as refused:
        load_server_config(tmp_path / "server.yaml")
    problem = refused.value.problems[0]
    assert problem.path.startswith("webhooks.endpoints.acme.0") and fragment in problem.message


def test_a_project_name_that_cannot_be_a_project_is_refused_at_load(tmp_path, stub_model_dir, receiver):
    write_server(tmp_path, stub_model_dir, receiver)
    text = (tmp_path / "server.yaml").read_text().replace("    acme:", "    Acme_Team:")
    (tmp_path / "server.yaml").write_text(text)
    with pytest.raises(SpecError) as refused:
        load_server_config(tmp_path / "server.yaml")
    assert refused.value.problems[0].path == "webhooks.endpoints.Acme_Team"


@pytest.mark.parametrize("value, fragment", [(None, "is not set"), ("hunter2", "does not hold a secret")])
def test_a_missing_or_malformed_secret_stops_the_server_naming_the_variable(tmp_path, stub_model_dir, monkeypatch,
                                                                           receiver, value, fragment):
    monkeypatch.chdir(tmp_path)
    write_server(tmp_path, stub_model_dir, receiver)
    if value is None:
        monkeypatch.delenv("ACME_WEBHOOK_SECRET", raising=False)
    else:
        monkeypatch.setenv("ACME_WEBHOOK_SECRET", value)
    served = load_server_config(tmp_path / "server.yaml")  # keys and render read server.yaml where no secret is
    with pytest.raises(SpecError) as refused:
        create_app(served)
    problem = refused.value.problems[0]
    assert problem.path == "webhooks.endpoints.acme.0.secret_env" and fragment in problem.message
    assert "ACME_WEBHOOK_SECRET" in problem.message and (value is None or value not in problem.message)


def test_a_name_that_resolves_to_an_internal_address_is_refused_unless_its_network_is_allowed():
    with pytest.raises(DeliveryError, match="resolves only to internal addresses"):
        checked_address("http://localhost:9/hook", [])
    assert checked_address("http://localhost:9/hook", ["127.0.0.0/8", "::1/128"]) in ("127.0.0.1", "::1")
    assert checked_address("http://127.0.0.1:9/hook", []) == "127.0.0.1"  # named as an address: the admin's choice
    with pytest.raises(DeliveryError, match="internal"):  # nothing is sent: the check comes before connecting
        webhooks.post("http://localhost:9/hook", b"{}", {}, 1.0, ["10.0.0.0/8"])


def test_url_prefixes_match_whole_path_segments_on_the_same_origin():
    allow = ["https://hooks.example.com/acme", "http://127.0.0.1:9999"]
    assert webhooks.allowed("https://hooks.example.com/acme", allow)
    assert webhooks.allowed("https://hooks.example.com/acme/jobs?x=1", allow)
    assert webhooks.allowed("https://HOOKS.example.com:443/acme/x", allow)
    assert webhooks.allowed("http://127.0.0.1:9999/anything", allow)
    for url in ["https://hooks.example.com/acme-evil", "https://hooks.example.com/", "http://hooks.example.com/acme",
                "https://hooks.example.com:8443/acme", "https://hooks.example.com.evil.net/acme",
                "http://127.0.0.1:9998/", "http://127.0.0.1/"]:
        assert not webhooks.allowed(url, allow), url


"""Webhooks: OpenAI's fine-tuning events, signed per Standard Webhooks, sent to the endpoints the admin allowed.

```yaml
webhooks:
  allow: [https://hooks.example.com, http://127.0.0.1:9999]   # where the server may call; nothing else is
  endpoints:                                                  # per project; each secret from the environment
    acme: [{url: https://hooks.example.com/acme, secret_env: ACME_WEBHOOK_SECRET}]
```

When a job of a project with endpoints ends, the event OpenAI sends (``fine_tuning.job.succeeded``, ``…failed``,
``…cancelled``; ``{"id": "evt_…", "object": "event", "created_at": …, "type": …, "data": {"id": "ftjob-…"}}``)
is written to the outbox in the storage, then POSTed to each of the project's endpoints with ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``
under the endpoint's ``whsec_`` secret): what the `openai` client's ``webhooks.unwrap`` checks.

- **At least once.** The outbox is objects in the storage (``_service/webhooks/``), each written by one owner and
  never rewritten by another (as the keys are): ``outbox/<project>/<event id>/event.json`` (an exclusive create, so
  an event is made once per job and type, whichever server sees the end first, across restarts: its id is derived
  from both), then per endpoint ``<endpoint id>.attempts`` (the latest failure and when to try again),
  ``.delivered`` or ``.failed`` (gave up).
  A restarted server reads the outbox and delivers what is left; a receiver may see an event twice (two servers on
  one storage, a crash between the POST and its mark) and tells them apart by ``webhook-id``.
- **Retries**: after a failed attempt the next waits ``first_delay_s`` × 4ⁿ (at most ``max_delay_s``), for
  ``attempts`` in all: 10 s … 10 h, about a day with the defaults. Only a 2xx answer delivers; a redirect is a
  failure (never followed: it would send the event, and the server, elsewhere).
- **Only where the admin allows.** Every URL must lie under an ``allow`` entry (same scheme, host and port, path
  at or below the entry's). The host is resolved at each attempt and the connection goes to the address that was
  checked (a name that resolves elsewhere a moment later, DNS rebinding, changes nothing); an internal address
  (loopback, private, link-local, …) is refused unless the URL names it as an IP address (then ``allow`` named it)
  or it lies in ``private_networks``.
- **Only new ends.** An endpoint is recorded in the storage the first time a server sees it
  (``endpoints/<endpoint id>.json``); it gets the events of jobs that end after that, not the project's history.
- **Projects' own endpoints**: OpenAI's ``/v1/webhook_endpoints`` (`webhook_routes`: create, list, retrieve,
  delete) lets a project key add endpoints under ``allow``; each is ``api/<project>/<id>.json`` with its secret
  (shown once, in the create answer), and ``<id>.deleted`` beside it once deleted. Other servers on the storage
  learn of them within `RELIST_S`.

The delivery thread never dies: each failure is logged and the next pass goes on. Nothing here imports torch or Ray.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunerun.cluster.runs import RunState, read_info
from tunerun.cluster.storage import backend_for
from tunerun.jobs.errors import Problem, SpecError, StorageError
from tunerun.jobs.plan import TUNERUN_VERSION
from tunerun.jobs.service.errors import bad_request, not_found
from tunerun.jobs.service.keys import project_name_problem
from tunerun.jobs.spec import StorageSpec, Strict, field_error, os_path

if TYPE_CHECKING:
    from tunerun.jobs.service.fine_tuning import JobService

logger = logging.getLogger("tunerun.serve")
WEBHOOKS = "_service/webhooks"
OUTBOX = f"{WEBHOOKS}/outbox"
ENDPOINTS = f"{WEBHOOKS}/endpoints"
API = f"{WEBHOOKS}/api"
MAX_PROJECT_ENDPOINTS = 10
EVENT_FILE = "event.json"
# OpenAI's event type for each state a job ends in (a paused job has not ended: it is resumed later).
EVENT_TYPES = {RunState.SUCCEEDED: "fine_tuning.job.succeeded", RunState.FAILED: "fine_tuning.job.failed",
               RunState.CANCELLED: "fine_tuning.job.cancelled"}
DEFAULT_PORTS = {"http": 80, "https": 443}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
SECRET = re.compile(r"whsec_([A-Za-z0-9+/]+={0,2})")
SECRET_BYTES = (24, 64)  # Standard Webhooks: a secret of 24 to 64 random bytes
NEW_SECRET = ("python -c \"import base64, secrets; print('whsec_' + "
              "base64.b64encode(secrets.token_bytes(32)).decode())\"")
MAX_URL = 2000
RELIST_S = 60.0  # how often the whole outbox is read again: events another server wrote and left undelivered
BACKOFF_FACTOR = 4


# ── server.yaml ─────────────────────────────────────────────────────────────────────────────────────────────

class EndpointEntry(Strict):
    url: str = Field(description="Where the project's events are POSTed; under one of webhooks.allow.")
    secret_env: str = Field(description="The environment variable holding the signing secret, whsec_<base64>.")

    @field_validator("url")
    @classmethod
    def _plain_url(cls, url: str) -> str:
        problem = url_problem(url)
        if problem:
            raise ValueError(problem)
        return url

    @field_validator("secret_env")
    @classmethod
    def _env_name(cls, name: str) -> str:
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"{name[:60]!r}: name an environment variable (letters, digits, '_'), e.g. "
                             "ACME_WEBHOOK_SECRET; the secret itself never goes in server.yaml")
        return name


class RetrySettings(Strict):
    """Attempts per event and endpoint; the wait after the n-th failure is ``first_delay_s`` × 4ⁿ⁻¹, capped."""

    attempts: int = Field(9, ge=1, le=30)
    first_delay_s: float = Field(10.0, gt=0, le=86400)
    max_delay_s: float = Field(36000.0, gt=0, le=7 * 86400)


class WebhookSettings(Strict):
    allow: list[str] = Field([], description="URL prefixes the server may call (scheme, host, port, path).")
    private_networks: list[str] = Field([], description="Internal networks a host name under allow may resolve "
                                                        "to, e.g. 10.20.0.0/16; other internal addresses are refused")
    endpoints: dict[str, list[EndpointEntry]] = Field({}, description="Project → its endpoints.")
    timeout_s: float = Field(10.0, gt=0, le=60, description="One attempt: connecting, sending, the answer.")
    retry: RetrySettings = RetrySettings()
    poll_s: float = Field(2.0, gt=0, le=60, description="How often ended jobs and due deliveries are looked for.")
    ca_bundle: str | None = Field(None, description="A private CA's PEM file, for receivers with certificates it "
                                                    "signed (default: the system's trusted CAs).")

    @field_validator("ca_bundle")
    @classmethod
    def _os_accepts(cls, path: str | None) -> str | None:
        return os_path(path)

    @field_validator("allow")
    @classmethod
    def _plain_prefixes(cls, allow: list[str]) -> list[str]:
        for entry in allow:
            problem = url_problem(entry)
            if problem:
                raise ValueError(f"{entry[:100]!r}: {problem}")
        return allow

    @field_validator("private_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network[:60]!r} is not a network: write it as an address and prefix length, "
                                 "e.g. 10.20.0.0/16") from None
        return networks

    @model_validator(mode="after")
    def _endpoints_allowed(self):
        for project, entries in self.endpoints.items():
            problem = project_name_problem(project)
            if problem:
                raise field_error(f"endpoints.{project}", problem)
            for index, entry in enumerate(entries):
                if not allowed(entry.url, self.allow):
                    raise field_error(f"endpoints.{project}.{index}.url", f"{entry.url[:200]} is not under "
                                      "webhooks.allow (" + (", ".join(self.allow) or "empty") + "): the server calls "
                                      "only addresses the admin allows; add its prefix to webhooks.allow")
        return self


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook address (or an allow entry), or None."""
    if len(url) > MAX_URL or any(not 0x21 <= ord(c) <= 0x7e for c in url) or "\\" in url:
        return f"must be a plain http(s) URL of at most {MAX_URL} printable ASCII characters, no spaces or '\\'"
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        return f"{url[:100]!r}: only http:// and https:// URLs are called (got scheme {parts.scheme or 'none'!r})"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "must not hold credentials (user:password@): the signature tells the receiver who is calling"
    if not parts.hostname:
        return f"{url[:100]!r} names no host, e.g. https://hooks.example.com/tunerun"
    try:
        parts.port
    except ValueError:
        return f"{url[:100]!r} has a port that is not a number from 1 to 65535"
    if parts.fragment:
        return "must not hold a #fragment (it is never sent)"
    if any(unquote(segment) in (".", "..") for segment in parts.path.split("/")):
        return "must not hold '.' or '..' path segments: write the path the receiver serves"
    return None


def allowed(url: str, allow: list[str]) -> bool:
    """Whether ``url`` lies under an entry of ``allow``: the same scheme, host and port, its path at or below the
    entry's (``https://h/acme`` allows ``https://h/acme/x``, not ``https://h/acme-x``)."""
    if url_problem(url):
        return False
    target = urlsplit(url)
    for entry in allow:
        prefix = urlsplit(entry)
        base = prefix.path.rstrip("/")
        if (_origin(target) == _origin(prefix)
                and (not base or target.path == base or target.path.startswith(base + "/"))):
            return True
    return False


def _origin(parts) -> tuple[str, str, int]:
    return parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme]


# ── payloads and signatures ─────────────────────────────────────────────────────────────────────────────────

def event_id(job_id: str, kind: str) -> str:
    """The event's id, the same on every server and after every restart: one event per job and type."""
    return "evt_" + hashlib.sha256(f"{job_id}\n{kind}".encode()).hexdigest()[:32]


def job_event(job_id: str, kind: str, at: float) -> dict:
    """OpenAI's webhook event for a fine-tuning job that ended (``at``: when)."""
    return {"id": event_id(job_id, kind), "object": "event", "created_at": int(at), "type": kind,
            "data": {"id": job_id}}


def parse_secret(text: str) -> bytes | None:
    """The key bytes of a ``whsec_<base64>`` secret of 24 to 64 bytes; None for anything else."""
    found = SECRET.fullmatch(text.strip())
    if not found:
        return None
    try:
        key = base64.b64decode(found.group(1), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if SECRET_BYTES[0] <= len(key) <= SECRET_BYTES[1] else None


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' ``webhook-signature``: ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``."""
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(key: bytes, message_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(key, message_id, timestamp, body),
            "content-type": "application/json", "user-agent": f"tunerun/{TUNERUN_VERSION} webhooks"}


def body_of(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


# ── endpoints ───────────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Endpoint:
    id: str
    project: str
    url: str
    key: bytes = field(repr=False)
    added_at: float = 0.0  # events of jobs that ended before are not its
    event_types: tuple[str, ...] = tuple(EVENT_TYPES.values())
    name: str = ""
    source: str = "server.yaml"  # or "api": made by the project through /v1/webhook_endpoints

    def wants(self, event: dict) -> bool:
        return event["type"] in self.event_types and event["created_at"] >= int(self.added_at)


def endpoint_id(project: str, url: str) -> str:
    return "we_" + hashlib.sha256(f"{project}\n{url}".encode()).hexdigest()[:16]


def configured_endpoints(settings: WebhookSettings, environ=os.environ) -> list[Endpoint]:
    """server.yaml's endpoints with their secrets read from the environment; `SpecError` naming every endpoint
    whose variable is unset or not a secret. Read when the server starts (not when server.yaml is checked: the
    keys command and `tunerun serve render` read it where no secret is)."""
    found, problems = [], []
    for project, entries in settings.endpoints.items():
        for index, entry in enumerate(entries):
            where = f"webhooks.endpoints.{project}.{index}.secret_env"
            value = environ.get(entry.secret_env)
            key = parse_secret(value) if value else None
            if value is None:
                problems.append(Problem(where, f"the environment variable {entry.secret_env} is not set: set it to "
                                               f"the endpoint's secret, e.g. the output of {NEW_SECRET}"))
            elif key is None:
                problems.append(Problem(where, f"{entry.secret_env} does not hold a secret: expected whsec_ and the "
                                               f"base64 of {SECRET_BYTES[0]} to {SECRET_BYTES[1]} random bytes, "
                                               f"e.g. the output of {NEW_SECRET}"))
            else:
                found.append(Endpoint(endpoint_id(project, entry.url), project, entry.url, key, name=entry.url))
    if problems:
        raise SpecError("server.yaml", problems)
    return found


# ── delivery ────────────────────────────────────────────────────────────────────────────────────────────────

class DeliveryError(Exception):
    """One attempt failed: the message says why, for the log."""


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever the name resolves to by now; Host stays the URL's."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # the certificate is the name's


def checked_address(url: str, private_networks: list[str]) -> str:
    """The address to connect to for ``url``: the first its host resolves to that is public, or internal and
    allowed (named as an IP in the URL, or in ``private_networks``); `DeliveryError` when there is none."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme]
    literal = _ip(host)
    try:
        resolved = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except OSError as exc:
        raise DeliveryError(f"{host} does not resolve: {exc}") from None
    networks = [ipaddress.ip_network(n, strict=False) for n in private_networks]
    for address in resolved:
        ip = _ip(address)
        if ip is None:
            continue
        if not _internal(ip) or ip == literal or any(ip in network for network in networks):
            return address
    raise DeliveryError(f"{host} resolves only to internal addresses ({', '.join(resolved)}), which are refused: "
                        "name the address itself in the URL and webhooks.allow, or its network in "
                        "webhooks.private_networks")


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _internal(ip) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    return not ip.is_global or ip.is_multicast


def tls_context(settings: WebhookSettings) -> ssl.SSLContext:
    """What an https endpoint's certificate is checked against: the system's CAs, or ``ca_bundle``'s."""
    try:
        return ssl.create_default_context(cafile=settings.ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise SpecError("server.yaml", [Problem("webhooks.ca_bundle", f"{settings.ca_bundle} cannot be read as "
                                                                      f"PEM certificates: {exc}")]) from None


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float, private_networks: list[str],
         context: ssl.SSLContext | None = None) -> int:
    """POST ``body`` to ``url`` once, on a checked address, following no redirect: the status of a 2xx answer;
    `DeliveryError` for any other answer or none. ``context``: for https (default: the system's CAs)."""
    parts = urlsplit(url)
    address = checked_address(url, private_networks)
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    if parts.scheme == "https":
        connection = _PinnedHTTPS(parts.hostname, port, address, timeout_s, context or ssl.create_default_context())
    else:
        connection = _PinnedHTTP(parts.hostname, port, address, timeout_s)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", target, body=body, headers=headers)
        status = connection.getresponse().status  # the body is not read: the status is the whole answer
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
    finally:
        connection.close()
    if 300 <= status < 400:
        raise DeliveryError(f"answered {status} (a redirect, not followed: point the endpoint at its final URL)")
    if not 200 <= status < 300:
        raise DeliveryError(f"answered {status}")
    return status


@dataclass
class Delivery:
    """One event to one endpoint, until it is delivered or given up."""

    event: dict
    endpoint: Endpoint
    attempts: int = 0
    next_at: float = 0.0

    @property
    def key(self) -> str:
        return f"{OUTBOX}/{self.endpoint.project}/{self.event['id']}/{self.endpoint.id}"


class Webhooks:
    """Finds the jobs of projects with endpoints that ended, writes their events to the outbox and delivers them
    from a thread of its own (`start`/`stop`); `tick` is one pass, for tests."""

    def __init__(self, settings: WebhookSettings, storage: StorageSpec, jobs: JobService,
                 endpoints: list[Endpoint] | None = None):
        self.settings, self.jobs = settings, jobs
        self.backend = backend_for(storage)
        self._logged: dict[str, str] = {}  # what was last logged per subject: each error once
        self.tls = tls_context(settings)
        self.configured = self._recorded(configured_endpoints(settings) if endpoints is None else endpoints)
        # The live list: replaced whole (never changed in place), so the thread and the API's handlers share it.
        self.endpoints: list[Endpoint] = self.configured + self._made_by_projects()
        self._lock = threading.Lock()  # creating and deleting endpoints through the API
        self._pending: dict[str, Delivery] = {}  # Delivery.key → what is left to deliver
        self._known: set[str] = set()  # event ids in the outbox (written here or read from it)
        self._events: dict[str, dict] = {}  # event id → its event.json, read once
        self._asked: dict[str, float] = {}  # job id → when its target was last asked for its state (monotonic)
        self._listed_at = -math.inf
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunerun-webhooks", daemon=True)

    def start(self) -> None:
        if self.settings.allow:  # endpoints can exist only under allow (projects may add theirs at any time)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            self.tick()

    def tick(self) -> None:
        """Read the outbox if due, write the events of jobs that ended, deliver what is due; never raises."""
        for step in (self._read_outbox, self._write_ended, self._deliver_due):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - the storage is away, or a bug: the next pass tries again
                self._note(step.__name__, f"webhooks: {step.__name__.strip('_').replace('_', ' ')} failed, trying "
                                          f"again: {type(exc).__name__}: {exc}")
            else:
                self._logged.pop(step.__name__, None)

    def pending(self) -> list[Delivery]:
        return list(self._pending.values())

    # ── the outbox ──────────────────────────────────────────────────────────────────────────────────────────

    def _recorded(self, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Each endpoint with the time a server first saw it (recorded then, never changed)."""
        found = []
        for endpoint in endpoints:
            key = f"{ENDPOINTS}/{endpoint.id}.json"
            self.backend.put_new(key, _json({"project": endpoint.project, "url": endpoint.url,
                                             "added_at": time.time()}))
            found.append(replace(endpoint, added_at=float(json.loads(self.backend.get(key))["added_at"])))
        return found

    def _read_outbox(self) -> None:
        """What is left to deliver, from one listing of the outbox every `RELIST_S`: at the first, everything (the
        server that wrote it is gone, or delivers it too: at least once); later, what another server wrote and left
        overdue by `RELIST_S` (it stopped)."""
        if time.monotonic() - self._listed_at < RELIST_S:
            return
        first, now = self._listed_at < 0, time.time()
        if not first:  # endpoints projects made or deleted through another server
            with self._lock:
                self.endpoints = self.configured + self._made_by_projects()
        names = self.backend.list(OUTBOX)
        for key in sorted(k for k in names if k.endswith("/" + EVENT_FILE)):
            self._known.add(key.split("/")[-2])
            try:
                self._take_over(key, names, first, now)
            except (StorageError, FileNotFoundError, ValueError, KeyError, TypeError) as exc:  # that event only
                self._note(key, f"webhooks: {key} cannot be read, left for now: {type(exc).__name__}: {exc}")
        self._listed_at = time.monotonic()

    def _take_over(self, key: str, names: dict, first: bool, now: float) -> None:
        """The deliveries of the event at ``key`` that nobody is making: not delivered, not given up, not pending
        here, and (after the first reading) overdue by `RELIST_S`."""
        project, name = key.split("/")[-3:-1]
        folder = f"{OUTBOX}/{project}/{name}"
        waiting = [e for e in self.endpoints if e.project == project
                   and f"{folder}/{e.id}.delivered" not in names and f"{folder}/{e.id}.failed" not in names
                   and f"{folder}/{e.id}" not in self._pending]
        if not waiting:
            return
        if name not in self._events:
            self._events[name] = json.loads(self.backend.get(key))
        stored = self._events[name]
        for endpoint in set(waiting) & set(self._endpoints_of(project, stored["event"])):
            delivery = Delivery(stored["event"], endpoint, next_at=float(stored.get("written_at", 0)))
            if f"{delivery.key}.attempts" in names:
                tried = json.loads(self.backend.get(f"{delivery.key}.attempts"))
                delivery.attempts, delivery.next_at = int(tried["attempts"]), float(tried["next_at"])
            if first or delivery.next_at < now - RELIST_S:
                self._pending[delivery.key] = delivery

    def _endpoints_of(self, project: str, event: dict) -> list[Endpoint]:
        return [e for e in self.endpoints if e.project == project and e.wants(event)]

    def _write_ended(self) -> None:
        """The event of each job of a project with endpoints that ended since they were added, once."""
        since = {}
        for endpoint in self.endpoints:
            since[endpoint.project] = min(endpoint.added_at, since.get(endpoint.project, endpoint.added_at))
        for run, record in self.jobs.index.every_job():
            if record.project not in since:
                continue
            try:
                info = self._state_of(run)
            except Exception as exc:  # noqa: BLE001 - one unreadable run must not hide the others
                self._note(run.run_id, f"webhooks: the state of job {run.run_id} cannot be read: {exc}")
                continue
            kind = EVENT_TYPES.get(info.state)
            ended_at = info.finished_at or time.time()
            if kind is None or event_id(run.run_id, kind) in self._known or int(ended_at) < int(since[record.project]):
                continue
            self._write(record.project, job_event(run.run_id, kind, ended_at))

    def _state_of(self, run):
        """The run's state: known finished, else run.json (the driver records how it ended), and every `RELIST_S`
        the run's target too (a driver killed outright could not record it; asking a cluster every pass would
        cost a squeue or an API call per running job). A finished one is told to the index: read once."""
        info = self.jobs.index.finished(run.run_id)
        if info is not None:
            return info
        if time.monotonic() - self._asked.get(run.run_id, -math.inf) >= RELIST_S:
            self._asked[run.run_id] = time.monotonic()
            return self.jobs.status(run)
        info = read_info(run)
        if info.state in EVENT_TYPES:
            self.jobs.index.note(run.run_id, info)
        return info

    def _write(self, project: str, event: dict) -> None:
        written = self.backend.put_new(f"{OUTBOX}/{project}/{event['id']}/{EVENT_FILE}",
                                       _json({"project": project, "event": event, "written_at": time.time()}))
        self._known.add(event["id"])
        if not written:  # another server saw the end first and delivers it (or the next reading of the outbox does)
            return
        logger.info("webhooks: %s for job %s in the outbox", event["type"], event["data"]["id"])
        for endpoint in self._endpoints_of(project, event):
            delivery = Delivery(event, endpoint)
            self._pending[delivery.key] = delivery

    # ── sending ─────────────────────────────────────────────────────────────────────────────────────────────

    def _deliver_due(self) -> None:
        """Each due delivery once, oldest first; an endpoint that failed in this pass is not tried again in it
        (a receiver that is down costs one timeout per pass, not one per event)."""
        failed: set[str] = set()
        now, live = time.time(), {e.id for e in self.endpoints}
        for delivery in sorted(self._pending.values(), key=lambda d: (d.next_at, d.event["created_at"])):
            if delivery.endpoint.id not in live:  # deleted by its project meanwhile
                self._pending.pop(delivery.key, None)
                continue
            if delivery.next_at > now or delivery.endpoint.id in failed:
                continue
            if not self._attempt(delivery):
                failed.add(delivery.endpoint.id)

    def _attempt(self, delivery: Delivery) -> bool:
        endpoint, event = delivery.endpoint, delivery.event
        body = body_of(event)
        delivery.attempts += 1
        try:
            post(endpoint.url, body, signed_headers(endpoint.key, event["id"], body), self.settings.timeout_s,
                 self.settings.private_networks, self.tls)
        except DeliveryError as exc:
            self._failed(delivery, str(exc))
            return False
        self._pending.pop(delivery.key, None)
        logger.info("webhooks: %s of job %s delivered to %s (attempt %d)", event["type"], event["data"]["id"],
                    endpoint.url, delivery.attempts)
        self._mark(f"{delivery.key}.delivered", {"delivered_at": time.time(), "attempts": delivery.attempts})
        return True

    def _failed(self, delivery: Delivery, error: str) -> None:
        retry, event = self.settings.retry, delivery.event
        what = f"webhooks: {event['type']} of job {event['data']['id']} to {delivery.endpoint.url}"
        if delivery.attempts >= retry.attempts:
            self._pending.pop(delivery.key, None)
            logger.error("%s: given up after %d attempts: %s", what, delivery.attempts, error)
            self._mark(f"{delivery.key}.failed", {"failed_at": time.time(), "attempts": delivery.attempts,
                                                  "error": error})
            return
        wait = min(retry.first_delay_s * BACKOFF_FACTOR ** (delivery.attempts - 1), retry.max_delay_s)
        delivery.next_at = time.time() + wait
        logger.warning("%s: attempt %d of %d failed (%s); next in %.0f s", what, delivery.attempts, retry.attempts,
                       error, wait)
        self._mark(f"{delivery.key}.attempts", {"attempts": delivery.attempts, "next_at": delivery.next_at,
                                                "error": error}, replace=True)

    def _mark(self, key: str, body: dict, replace: bool = False) -> None:
        """Record a delivery's progress; a failed write is logged and costs at most a repeated delivery."""
        try:
            (self.backend.put if replace else self.backend.put_new)(key, _json(body))
        except (OSError, StorageError) as exc:
            self._note(key, f"webhooks: could not record {key} ({exc}); a restart may deliver that event again")

    def _note(self, key: str, message: str) -> None:
        """Log ``message`` unless it is what was last logged for ``key`` (a storage outage says it every pass)."""
        if self._logged.get(key) != message:
            self._logged[key] = message
            logger.warning("%s", message)

    # ── endpoints projects manage (OpenAI's /v1/webhook_endpoints) ─────────────────────────────────────────

    def _made_by_projects(self) -> list[Endpoint]:
        """The endpoints projects made and have not deleted: ``api/<project>/<id>.json``, each written once with
        its secret, and ``<id>.deleted`` beside it once deleted (nothing is rewritten: see the module doc)."""
        names = self.backend.list(API)
        found = []
        for key in sorted(names):
            if not key.endswith(".json") or key.removesuffix(".json") + ".deleted" in names:
                continue
            try:
                record = json.loads(self.backend.get(key))
                if parse_secret(record["secret"]) is None:
                    raise ValueError("its secret is not a whsec_ secret")
                found.append(Endpoint(record["id"], record["project"], record["url"], parse_secret(record["secret"]),
                                      float(record["created_at"]), tuple(record["event_types"]), record["name"],
                                      "api"))
            except (StorageError, FileNotFoundError, ValueError, KeyError, TypeError) as exc:  # one bad record only
                self._note(key, f"webhooks: endpoint {key} cannot be read, left out: {type(exc).__name__}: {exc}")
        return found

    def of_project(self, project: str) -> list[Endpoint]:
        """The project's endpoints, newest first."""
        return sorted((e for e in self.endpoints if e.project == project), key=lambda e: -e.added_at)

    def create(self, project: str, request: EndpointRequest) -> tuple[Endpoint, str]:
        """A new endpoint of ``project``: (it, its secret — the only time anyone is shown it)."""
        problem = url_problem(request.url)
        if problem:
            raise bad_request(f"url: {problem}", "url")
        if not allowed(request.url, self.settings.allow):
            raise bad_request(f"url: {request.url[:200]} is not an address this server may call; ask your platform "
                              "team to add its prefix to webhooks.allow", "url", "url_not_allowed")
        unknown = sorted(set(request.event_types) - set(EVENT_TYPES.values()))
        if unknown:
            raise bad_request(f"event_types: this server sends only {', '.join(EVENT_TYPES.values())} (got "
                              f"{', '.join(t[:60] for t in unknown[:3])})", "event_types")
        with self._lock:
            if len(self.of_project(project)) >= MAX_PROJECT_ENDPOINTS:
                raise bad_request(f"a project has at most {MAX_PROJECT_ENDPOINTS} webhook endpoints: delete one "
                                  "first", None, "too_many_endpoints")
            secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
            endpoint = Endpoint("we_" + secrets.token_hex(12), project, request.url, parse_secret(secret),
                                time.time(), tuple(dict.fromkeys(request.event_types)), request.name, "api")
            record = {"id": endpoint.id, "project": project, "url": endpoint.url, "name": endpoint.name,
                      "event_types": list(endpoint.event_types), "created_at": endpoint.added_at, "secret": secret}
            self.backend.put_new(f"{API}/{project}/{endpoint.id}.json", _json(record))
            self.endpoints = [*self.endpoints, endpoint]
        return endpoint, secret

    def owned(self, project: str, ident: str) -> Endpoint:
        found = next((e for e in self.of_project(project) if e.id == ident), None)
        if found is None:
            raise not_found("webhook endpoint", ident[:60], "webhook_endpoint_id")
        return found

    def delete(self, project: str, ident: str) -> None:
        endpoint = self.owned(project, ident)
        if endpoint.source != "api":
            raise bad_request(f"{ident} is set in the server's configuration; ask your platform team to remove it",
                              "webhook_endpoint_id", "managed_by_server")
        with self._lock:
            self.backend.put_new(f"{API}/{project}/{ident}.deleted", _json({"deleted_at": time.time()}))
            self.endpoints = [e for e in self.endpoints if e.id != ident]


class EndpointRequest(BaseModel):
    """The body of ``POST /v1/webhook_endpoints`` (OpenAI's)."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=MAX_URL)
    name: str = Field(min_length=1, max_length=128)
    event_types: list[str] = Field(min_length=1, max_length=32)


def endpoint_object(endpoint: Endpoint) -> dict:
    """OpenAI's webhook endpoint object, with a hint of its secret (the secret itself is shown once, at creation)."""
    secret = base64.b64encode(endpoint.key).decode()
    return {"object": "webhook_endpoint", "id": endpoint.id, "created_at": int(endpoint.added_at),
            "updated_at": int(endpoint.added_at), "name": endpoint.name, "url": endpoint.url,
            "event_types": list(endpoint.event_types), "signing_secret_hint": f"whsec_…{secret[-4:]}",
            "tunerun": {"managed_by": endpoint.source}}


def webhook_routes(app, hooks: Webhooks, project_of) -> None:
    """OpenAI's ``/v1/webhook_endpoints`` on the FastAPI ``app``: create, list, retrieve and delete a project's own
    endpoints (update is refused: delete and create)."""
    from fastapi import Depends  # here: server.yaml's checks (this module's settings) load without the web stack

    @app.post("/v1/webhook_endpoints")
    def create_endpoint(body: EndpointRequest, project: str = Depends(project_of)):
        endpoint, secret = hooks.create(project, body)
        return endpoint_object(endpoint) | {"signing_secret": secret}

    @app.get("/v1/webhook_endpoints")
    def list_endpoints(project: str = Depends(project_of), after: str | None = None, limit: int = 20):
        if not 1 <= limit <= 100:
            raise bad_request(f"limit must be between 1 and 100 (got {limit})", "limit")
        found = [endpoint_object(e) for e in hooks.of_project(project)]
        if after is not None:
            ids = [e["id"] for e in found]
            if after not in ids:
                raise bad_request(f"after={after[:60]!r} is not an id of this list", "after")
            found = found[ids.index(after) + 1:]
        return {"object": "list", "data": found[:limit], "has_more": len(found) > limit}

    @app.get("/v1/webhook_endpoints/{endpoint_id}")
    def retrieve_endpoint(endpoint_id: str, project: str = Depends(project_of)):
        return endpoint_object(hooks.owned(project, endpoint_id))

    @app.post("/v1/webhook_endpoints/{endpoint_id}")
    def update_endpoint(endpoint_id: str, project: str = Depends(project_of)):
        hooks.owned(project, endpoint_id)
        raise bad_request("endpoints are not changed on this server: delete this one and create another",
                          "webhook_endpoint_id", "unsupported")

    @app.delete("/v1/webhook_endpoints/{endpoint_id}")
    def delete_endpoint(endpoint_id: str, project: str = Depends(project_of)):
        hooks.delete(project, endpoint_id)
        return {"object": "webhook_endpoint.deleted", "id": endpoint_id, "deleted": True}


def _json(body: dict) -> bytes:
    return (json.dumps(body, indent=2) + "\n").encode("utf-8")

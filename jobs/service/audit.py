"""The audit trail of `tunerun serve`: every state-changing request, who made it, from where, and how it ended.

One record per action, appended to the storage under ``_service/audit/<UTC day>/``: when, the project, the key id
(never the key), the client's address, the action, the object it acted on and the result (the HTTP status; ``ok``
for the admin's CLI). Never a key, a session cookie, a request body or a file's content: the action, the ids and
the status are all a record holds, and each text field is cut to `MAX_FIELD` characters (a path is the client's
to choose).

Where records come from, one place per kind:

- `AuditRecorder`, in front of the app: every request that is not GET/HEAD/OPTIONS, once it has a project (the
  gate authenticated it, or the sign-in page named one), under its route's name (``create_file``, ``cancel_job``,
  ``sign_in``…). A request without a valid key is refused before it is anyone's (401) and is not recorded —
  only a failed sign-in is, without a project. Chat and completions change nothing and are not recorded.
- `tunerun serve keys create|revoke` (``create_key``, ``revoke_key``, the address being ``cli:<user>@<host>``).

Several servers and the CLI write at once with no lock between them (on S3 there is none to take), so no writer
ever appends to another's object: each `AuditTrail` writes its own segments,
``<day>/<HHMMSS>-<writer>-<n>.jsonl``, started anew each UTC day and past `SEGMENT_BYTES`. On S3, where an append
rewrites the object, that bounds what each record costs to write; the day folders let a read of the last 7 days
list and read only those 7. A record is written before the response leaves, so a client that has its answer
finds it in the trail. A record the storage refuses (a full disk, S3 unreachable) is logged whole to the server's
log with ``audit record lost``, and the request keeps its own result: the trail must not turn a done deletion into
a 500.
"""
from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import re
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunerun.cluster.storage import backend_for
from tunerun.jobs.errors import StorageError
from tunerun.jobs.service.gate import INFERENCE_PATHS, PROJECT, SAFE_METHODS
from tunerun.jobs.service.keys import KEY_PATTERN
from tunerun.jobs.service.sessions import SESSION_COOKIE
from tunerun.jobs.spec import StorageSpec

AUDIT = "_service/audit"
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
SEGMENT_BYTES = 64 << 10  # ~250 records; on S3 each record rewrites its segment, so this bounds a write's size
MAX_FIELD = 200
MAX_BODY_PEEK = 64 << 10  # a created object's id is read from a JSON answer up to this size
CLI_RESULT = "ok"
# What a route's handler may leave in the request's state for the record: who signed in or out (those requests
# carry no key for the gate to authenticate).
IDENTITY = "tunerun_audit_identity"
RECORDED_WITHOUT_PROJECT = ("sign_in",)  # a failed sign-in is worth a record though it names nobody
logger = logging.getLogger("tunerun.serve")


@dataclass(frozen=True)
class AuditRecord:
    time: float
    action: str
    result: int | str  # the HTTP status; `CLI_RESULT` for the admin's CLI
    project: str | None = None
    key_id: str | None = None
    address: str | None = None
    object: str | None = None

    def to_json(self) -> dict:
        return {name: _bounded(value) for name, value in asdict(self).items()}

    @classmethod
    def from_json(cls, data) -> AuditRecord | None:
        """A stored record; None for a line that is not one (another version's fields are left out)."""
        try:
            return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})
        except (AttributeError, TypeError):
            return None


def _bounded(value):
    return value[:MAX_FIELD - 1] + "…" if isinstance(value, str) and len(value) > MAX_FIELD else value


def day_of(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.timezone.utc).strftime("%Y-%m-%d")


class AuditTrail:
    """This process's writer of the trail, and the reader of everyone's."""

    def __init__(self, storage: StorageSpec):
        self.backend = backend_for(storage)  # its own: flushing it pushes only this trail's segments
        self._writer = secrets.token_hex(4)
        self._segment: tuple[str, str] | None = None  # (day, key) being written
        self._written, self._count = 0, 0
        self._lock = threading.Lock()

    def record(self, record: AuditRecord) -> bool:
        """Append ``record``; False when the storage refused it (logged, with the record: nothing is raised)."""
        line = (json.dumps(record.to_json(), sort_keys=True) + "\n").encode("utf-8")
        try:
            with self._lock:
                self.backend.append(self._segment_for(record.time, len(line)), line)
                self.backend.flush()  # on S3 an append waits in memory until flushed: a record must not
        except (OSError, StorageError) as exc:
            with self._lock:
                self._segment = None  # a line may be half written there: the next record starts a segment afresh
            logger.error("audit record lost (%s): %s", exc, json.dumps(record.to_json(), sort_keys=True))
            return False
        return True

    def _segment_for(self, moment: float, size: int) -> str:
        day = day_of(moment)
        if self._segment is None or self._segment[0] != day or self._written + size > SEGMENT_BYTES:
            self._count += 1
            started = dt.datetime.fromtimestamp(moment, dt.timezone.utc).strftime("%H%M%S")
            self._segment = (day, f"{AUDIT}/{day}/{started}-{self._writer}-{self._count}.jsonl")
            self._written = 0
        self._written += size
        return self._segment[1]

    def read(self, since: float | None = None, project: str | None = None) -> list[AuditRecord]:
        """The records from ``since`` on (of ``project`` only, when given), oldest first; only the days from
        ``since`` on are listed and read."""
        first_day = day_of(since) if since is not None else ""
        found = []
        for day in self.backend.children(AUDIT):
            if not DAY.fullmatch(day) or day < first_day:
                continue
            for key in sorted(self.backend.list(f"{AUDIT}/{day}")):
                found += _records(self.backend.get(key))
        return sorted((r for r in found if (since is None or r.time >= since)
                       and (project is None or r.project == project)), key=lambda r: r.time)


def _records(data: bytes) -> list[AuditRecord]:
    found = []
    for line in data.splitlines():
        try:
            record = AuditRecord.from_json(json.loads(line))
        except ValueError:  # a line cut off by a full disk: the rest of the segment still reads
            continue
        if record is not None and isinstance(record.time, (int, float)):
            found.append(record)
    return found


def cli_address() -> str:
    """Who ran a `tunerun serve` command, as the trail's address: ``cli:<user>@<host>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry
        user = "?"
    return f"cli:{user}@{socket.gethostname()}"


def identify(request: Request, project: str, key_id: str) -> None:
    """Name who a request without a key acts for (a sign-in, a sign-out), for its record."""
    setattr(request.state, IDENTITY, (project, key_id))


# ── the recorder in front of the app ────────────────────────────────────────────────────────────────────────

class AuditRecorder:
    """Plain ASGI around the app (outside `RequestGate`, so it sees what the gate refused with a project known,
    a 413, as well as what the routes answered): records each state-changing request once, before its answer
    leaves (the headers wait for the body: a client holding the answer finds the record)."""

    def __init__(self, app: ASGIApp, service, routes):
        self.app, self.service, self.routes = app, service, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS or scope["path"] in INFERENCE_PATHS:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # the gate and the handlers write into this same dict
        action, object_id = self._route(scope)
        status, body, recorded, start, forwarded = 500, bytearray(), False, None, False

        async def record(result: int) -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                await run_in_threadpool(self._record, scope, action, object_id, result, bytes(body))

        async def recording_send(message: Message) -> None:
            nonlocal status, start, forwarded
            if message["type"] == "http.response.start":
                # Held until the body: an empty one (a redirect) is complete for the client with its headers.
                status, start = message["status"], message
                return
            if message["type"] == "http.response.body":
                if object_id is None and len(body) < MAX_BODY_PEEK:
                    body.extend(message.get("body", b"")[:MAX_BODY_PEEK])
                if not message.get("more_body", False):
                    await record(status)
            if start is not None:
                await send(start)
                start, forwarded = None, True
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except BaseException:
            # An error no handler answered: Starlette's outermost layer answers 500 unless a response was under way.
            await record(status if forwarded else 500)
            raise
        await record(status)  # a response that ended without a final body message
        if start is not None:
            await send(start)

    def _route(self, scope: Scope) -> tuple[str, str | None]:
        """The route's name and the id in its path (``file_id``, ``job_id``), matched as the router will."""
        partial = None
        for route in self.routes:
            match, child = route.matches(scope)
            if match == Match.FULL or (match == Match.PARTIAL and partial is None):
                found = (getattr(route, "name", None) or "unknown_route",
                         next(iter(child.get("path_params", {}).values()), None))
                if match == Match.FULL:
                    return found
                partial = found  # the path is a route's, the method is not (405)
        return partial or ("unknown_route", scope["path"])

    def _record(self, scope: Scope, action: str, object_id: str | None, status: int, body: bytes) -> None:
        project, key_id = self._who(scope)
        if project is None and action not in RECORDED_WITHOUT_PROJECT:
            return  # refused before it was anyone's (401): recording those would let anyone fill the storage
        client = scope.get("client")
        if object_id is None and 200 <= status < 300:
            object_id = _created_id(body)
        self.service.audit.record(AuditRecord(time=time.time(), action=action, result=status, project=project,
                                              key_id=key_id, address=client[0] if client else None,
                                              object=object_id))

    def _who(self, scope: Scope) -> tuple[str | None, str | None]:
        """(project, key id) the request acted for: what a handler named, else the gate's project and the id of
        the key or session it came with (the gate checked them)."""
        state = scope["state"]
        if IDENTITY in state:
            return state[IDENTITY]
        project = state.get(PROJECT)
        if project is None:
            return None, None
        request = Request(scope)
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            match = KEY_PATTERN.fullmatch(key.strip())
            return project, match.group(1) if match else None
        session = self.service.sessions.read(request.cookies.get(SESSION_COOKIE))
        return project, session.key_id if session else None


def _created_id(body: bytes) -> str | None:
    """The id a creating route answered with (a file's, a job's)."""
    try:
        found = json.loads(body).get("id")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None

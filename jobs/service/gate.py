"""What a request must pass before any handler reads its body: a key (for the API), and a bounded size.

FastAPI reads and parses a JSON body before a route's dependencies run, so checking the key in a dependency let
anyone without one make the server hold a 200 MB body in memory. `RequestGate` sits in front of the app as plain
ASGI middleware: an ``/v1/`` request is authenticated from its headers alone (a wrong key costs a hash, never a
read of the body); then the body is admitted only up to its route's limit — the declared Content-Length is
checked before a byte is read, and a chunked body is counted as it arrives and refused the moment it passes the
limit. API bodies are small (``limits.max_request_bytes``) and buffered here; an upload
(``uploads.max_file_bytes``) streams on to the multipart parser, counted.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunerun.jobs.service.errors import ApiError, bad_request
from tunerun.jobs.service.sessions import CSRF_HEADER

UPLOAD_PATH = "/v1/files"
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
CHAT_RENDER_PATH = "/v1/chat/completions/render"  # tunerun's own: the prompt a chat request becomes
INFERENCE_PATHS = (CHAT_PATH, COMPLETIONS_PATH, CHAT_RENDER_PATH)  # their bodies are chat histories: a limit of their own
MULTIPART_OVERHEAD = 64 << 10  # boundaries and the purpose field around the file itself
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
PROJECT = "tunerun_project"  # where the gate leaves the authenticated project in the request's state


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, what: str = "request body", param: str | None = None):
        super().__init__(413, f"the {what} is over this server's limit of {limit:,} bytes", param,
                         "file_too_large" if param == "file" else "request_too_large")


def authenticate(service, request: Request) -> str:
    """The project a request acts for: its key's, or its dashboard session's (a state-changing request with a
    session must carry the session's CSRF token)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        project = service.keys.project_of(key.strip())
    else:
        session = service.session_of(request)
        if session is not None and request.method not in SAFE_METHODS \
                and not service.sessions.csrf_ok(session, request.headers.get(CSRF_HEADER)):
            raise ApiError(403, "this request carries no valid CSRF token for your session: reload the page and try "
                                "again", code="csrf_failed")
        project = session.project if session else None
    if project is None:
        raise ApiError(401, "Incorrect API key provided: pass your project's key as 'Authorization: Bearer tr-…' "
                            "(your platform team gives out the keys)", code="invalid_api_key")
    return project


def error_response(error: ApiError) -> JSONResponse:
    headers = {"x-should-retry": "false"} if 400 <= error.status < 500 else {}
    headers |= error.headers
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class RequestGate:
    def __init__(self, app: ASGIApp, service):
        self.app, self.service = app, service
        self.upload_limit = service.served.config.uploads.max_file_bytes + MULTIPART_OVERHEAD
        self.body_limit = service.served.config.limits.max_request_bytes
        self.inference_limit = service.served.config.inference.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        upload = scope["path"] == UPLOAD_PATH and scope["method"] == "POST"
        limit = self.upload_limit if upload else \
            self.inference_limit if scope["path"] in INFERENCE_PATHS else self.body_limit
        try:
            if scope["path"].startswith("/v1/"):
                project = await run_in_threadpool(authenticate, self.service, request)
                scope.setdefault("state", {})[PROJECT] = project
            _check_declared_length(request, limit, upload)
            receive = _counted(receive, limit) if upload else await _buffered(receive, limit)
        except ApiError as error:
            await error_response(error)(scope, receive, send)
            return
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except BaseException as exc:  # an upload past its limit surfaces from inside the multipart parser
            if started or (too_large := _body_too_large(exc)) is None:
                raise
            await error_response(too_large)(scope, receive, send)


def project_of(request: Request) -> str:
    """The dependency every ``/v1/`` route takes: the project `RequestGate` authenticated."""
    project = getattr(request.state, PROJECT, None)
    if project is None:  # a /v1/ route always passes the gate: this would be a route mounted elsewhere
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
    return project


def _body_too_large(exc: BaseException) -> BodyTooLarge | None:
    """The `BodyTooLarge` in ``exc``: itself, or inside the exception group of a middleware's task group."""
    if isinstance(exc, BodyTooLarge):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        return next((found for inner in exc.exceptions if (found := _body_too_large(inner))), None)
    return None


def _check_declared_length(request: Request, limit: int, upload: bool) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise bad_request(f"Content-Length {declared[:20]!r} is not a byte count", None, "invalid_request")
    if int(declared) > limit:
        raise BodyTooLarge(limit - MULTIPART_OVERHEAD if upload else limit, "upload" if upload else "request body",
                           "file" if upload else None)


async def _buffered(receive: Receive, limit: int) -> Callable[[], Awaitable[Message]]:
    """Read the whole (small) body now, refusing it once it passes ``limit``; the app then reads the copy."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away: the app sees the disconnect
        size += len(message.get("body", b""))
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            break
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return message

    return replay


def _counted(receive: Receive, limit: int) -> Callable[[], Awaitable[Message]]:
    """Pass the body on as it streams, counting: past ``limit`` the read fails (the route answers 413)."""
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise BodyTooLarge(limit - MULTIPART_OVERHEAD, "upload", "file")
        return message

    return counted

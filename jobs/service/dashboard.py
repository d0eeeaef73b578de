"""The dashboard: pages for a project's jobs, served by `tunerun serve` beside the API.

The pages are Jinja2 shells (the project's name, the session's CSRF token, the page's skeleton); what they show
comes from the API by a plain module script per page (``static/*.js``), with the session cookie instead of a
key, so the dashboard and the `openai` client never disagree. Everything is served from here (Chart.js is bundled
under ``static/vendor``: the cluster is offline). Pages carry a strict Content-Security-Policy (scripts only
from this server, no inline code), so text from a job (a suffix, metadata, a model's output) can only ever be
text: the scripts write it with ``textContent``.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunerun.jobs.errors import StorageError
from tunerun.jobs.plan import TUNERUN_VERSION
from tunerun.jobs.service.audit import identify
from tunerun.jobs.service.errors import ApiError
from tunerun.jobs.service.sessions import SESSION_COOKIE, SIGNIN_COOKIE, signin_token, tokens_match

HERE = Path(__file__).parent
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
               "frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SIGNIN_MESSAGES = {"expired": "Your session has ended. Sign in again with your project's API key.",
                   "signed_out": "You are signed out."}


class HardenedHeaders:
    """Every response says nosniff and same-origin. Plain ASGI: Starlette's ``@app.middleware`` would carry each
    streamed chunk through a queue of its own and hide a client's disconnect from a streaming answer."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("x-content-type-options", "nosniff")
                headers.setdefault("referrer-policy", "same-origin")
            await send(message)

        await self.app(scope, receive, hardened)


def dashboard_routes(app: FastAPI, service) -> None:
    pages = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html", "j2"]))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    app.add_middleware(HardenedHeaders)

    def page(name: str, status: int = 200, **context) -> HTMLResponse:
        html = pages.get_template(f"{name}.html.j2").render(version=TUNERUN_VERSION, **context)
        return HTMLResponse(html, status_code=status, headers={"content-security-policy": PAGE_POLICY,
                                                               "cache-control": "no-store"})

    def signed_in_page(request: Request, name: str, **context) -> Response:
        session = service.session_of(request)
        if session is None:
            why = "expired" if request.cookies.get(SESSION_COOKIE) else None
            response = RedirectResponse(f"/signin?{why}=1" if why else "/signin", status_code=303)
            response.delete_cookie(SESSION_COOKIE, path="/")
            return response
        return page(name, project=session.project, csrf_token=service.sessions.csrf_token(session), **context)

    @app.get("/", include_in_schema=False)
    def jobs_page(request: Request):
        return signed_in_page(request, "jobs")

    @app.get("/new", include_in_schema=False)
    def new_job_page(request: Request):
        return signed_in_page(request, "new")

    @app.get("/compare", include_in_schema=False)
    def compare_page(request: Request):
        return signed_in_page(request, "compare")

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def job_page(request: Request, job_id: str):
        session = service.session_of(request)
        if session is not None:
            try:
                service.jobs.owned(session.project, job_id)
            except ApiError:  # another project's job looks exactly like one that does not exist
                return page("message", 404, project=session.project,
                            csrf_token=service.sessions.csrf_token(session), title="No such job",
                            message=f"Project {session.project} has no job {job_id}. The jobs page lists its jobs.")
        return signed_in_page(request, "job", job_id=job_id)

    _signin_routes(app, service, page)


def _signin_routes(app: FastAPI, service, page) -> None:
    def signin_form(status: int = 200, error: str | None = None, notice: str | None = None) -> HTMLResponse:
        token = signin_token()
        response = page("signin", status, signin_token=token, error=error, notice=notice)
        response.set_cookie(SIGNIN_COOKIE, token, max_age=3600, httponly=True, samesite="strict", path="/signin")
        return response

    @app.get("/signin", include_in_schema=False)
    def signin_page(request: Request):
        notice = next((text for flag, text in SIGNIN_MESSAGES.items() if flag in request.query_params), None)
        return signin_form(notice=notice)

    @app.post("/signin", include_in_schema=False)
    async def sign_in(request: Request):
        form = await request.form(max_files=0, max_fields=4)
        if not tokens_match(request.cookies.get(SIGNIN_COOKIE), str(form.get("csrf_token") or "")):
            return signin_form(400, error="This sign-in form had expired or came from another site, so it was not "
                                          "used. Sign in again from this page.")
        record = service.keys.record_of(str(form.get("api_key") or "").strip())
        if record is None:
            return signin_form(401, error="That API key is not valid: it is wrong, mistyped or revoked. Ask your "
                                          "platform team for your project's key (tr-…).")
        identify(request, record.project, record.key_id)  # for the audit trail: the request carries no key
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, service.sessions.issue(record), max_age=int(service.sessions.lifetime_s),
                            httponly=True, samesite="strict", secure=_https(request), path="/")
        response.delete_cookie(SIGNIN_COOKIE, path="/signin")
        return response

    @app.post("/signout", include_in_schema=False)
    async def sign_out(request: Request):
        form = await request.form(max_files=0, max_fields=4)
        session = service.sessions.read(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            identify(request, session.project, session.key_id)
        if session is not None and not service.sessions.csrf_ok(session, str(form.get("csrf_token") or "")):
            return page("message", 400, title="Not signed out",
                        message="That sign-out form did not come from this dashboard. Use the Sign out button.")
        if session is not None:
            try:
                service.sessions.end(session)  # on every server: a copy of the cookie must not outlive it
            except (OSError, StorageError):
                return page("message", 503, title="Not signed out",
                            message="The server could not record the sign-out in its storage, so this session "
                                    "still works. Try again in a moment.")
        response = RedirectResponse("/signin?signed_out=1", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response


def _https(request: Request) -> bool:
    """Behind a TLS-terminating proxy the request arrives as http; the proxy says what the browser used."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"

"""The HTTP surface of `tunerun serve`: OpenAI's Files, Fine-tuning, Models, Chat and Completions endpoints, `/v1`.

FastAPI on uvicorn; the OpenAPI page is at ``/docs``. Every request carries a project's key (``Authorization:
Bearer tr-…``) or the dashboard's session cookie (`tunerun.jobs.service.sessions`; then a state-changing request
needs the session's CSRF token) and sees only that project's objects: anything else is 404, as if it did not
exist. Errors have OpenAI's shape (`tunerun.jobs.service.errors`). Handlers are plain functions: FastAPI runs them
in its thread pool, so storage calls block only their own request.

Beside OpenAI's endpoints, tunerun's own (same keys, same walls): a job's evaluation, data report, report page and
artifacts (downloads), and a comparison of jobs. The dashboard (`tunerun.jobs.service.dashboard`) reads only these
endpoints, so it shows what the `openai` client sees.
"""
from __future__ import annotations

import logging
import shutil
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunerun.cluster import compare
from tunerun.cluster.run_folder import METRICS, REPORT
from tunerun.cluster.space import is_disk_full
from tunerun.cluster.storage import cache_root
from tunerun.jobs.errors import TunerunError
from tunerun.jobs.plan import TUNERUN_VERSION
from tunerun.jobs.service import objects, outcomes, usage
from tunerun.jobs.service.audit import AuditRecorder, AuditTrail
from tunerun.jobs.service.config import Served
from tunerun.jobs.service.downloads import stream_tar
from tunerun.jobs.service.engines import build_engines
from tunerun.jobs.service.errors import ApiError, bad_request, not_found, tenant_text
from tunerun.jobs.service.files import FileStore, Validator, upload_folder
from tunerun.jobs.service.fine_tuning import CHECKPOINT_MODEL, JobRequest, JobService
from tunerun.jobs.service.inference import Gateway, inference_routes
from tunerun.jobs.service.keys import KeyStore
from tunerun.jobs.service.scheduler import Scheduler
from tunerun.jobs.service.gate import RequestGate, error_response, project_of
from tunerun.jobs.service.sessions import SESSION_COOKIE, Session, SessionSigner
from tunerun.jobs.service.webhooks import Webhooks, webhook_routes

COPY_CHUNK = 1 << 20
logger = logging.getLogger("tunerun.serve")
# tunerun's own report page is served in a sandbox: its inline styles apply, nothing in it can run.
REPORT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox; frame-ancestors 'self'"


class Service:
    """The stores the handlers share, built once from the configuration."""

    def __init__(self, served: Served):
        storage = served.config.storage
        self.served, self.keys, self.files = served, KeyStore(storage), FileStore(storage)
        self.jobs = JobService(served, self.files)
        self.sessions = SessionSigner(storage, served.config.sessions.hours * 3600)
        self.scheduler = Scheduler(self.jobs)
        self.webhooks = Webhooks(served.config.webhooks, storage, self.jobs)  # endpoints' secrets: from the env
        self.validator = Validator(self.files)
        engines = build_engines(served.config.inference.engines,
                                {name: served.templates[name].model.path for name in served.config.inference.engines},
                                cache_root() / "serve" / "engines")
        self.gateway = Gateway(self, engines)
        self.audit = AuditTrail(storage)

    def session_of(self, request: Request) -> Session | None:
        """The dashboard session of a request: a valid cookie whose key is still unrevoked."""
        session = self.sessions.read(request.cookies.get(SESSION_COOKIE))
        return session if session is not None and self.keys.active(session.key_id) is not None else None


def create_app(served: Served) -> FastAPI:
    service = Service(served)

    @asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=service.validator.recover, daemon=True).start()
        service.scheduler.start()
        service.webhooks.start()
        await service.gateway.open()
        yield
        await service.gateway.close()
        service.scheduler.stop()
        service.webhooks.stop()
        service.validator.shutdown()

    app = FastAPI(title="tunerun", version=TUNERUN_VERSION, lifespan=lifespan,
                  description="OpenAI-compatible fine-tuning on your own hardware")
    app.state.service = service
    _error_handlers(app)

    @app.get("/healthz", include_in_schema=False)
    def healthz():  # no key needed: the orchestrator's probes ask it
        scheduler = service.scheduler.health()
        if scheduler["scheduler"] in ("stopped", "stalled"):  # queued jobs would wait forever: restart this server
            return JSONResponse({"status": "unhealthy", **scheduler}, status_code=503)
        engines = service.gateway.health()  # a dead engine is restarted here, not by restarting this server
        return {"status": "ok", **({"engines": engines} if engines else {})}

    _file_routes(app, service, project_of)
    _job_routes(app, service, project_of)
    _model_routes(app, service, project_of)
    _outcome_routes(app, service, project_of)
    inference_routes(app, service.gateway, project_of)
    webhook_routes(app, service.webhooks, project_of)
    from tunerun.jobs.service.dashboard import dashboard_routes

    dashboard_routes(app, service)
    app.add_middleware(RequestGate, service=service)  # outermost: before any body is read
    # Around the gate (it reads no body): it records what the gate refused once the request was a project's (413).
    app.add_middleware(AuditRecorder, service=service, routes=app.router.routes)
    return app


# ── files ───────────────────────────────────────────────────────────────────────────────────────────────────

def _file_routes(app: FastAPI, service: Service, project_of) -> None:
    limit = service.served.config.uploads.max_file_bytes

    @app.post("/v1/files")
    async def create_file(request: Request, project: str = Depends(project_of)):
        form = await request.form(max_files=1, max_fields=4)  # the gate has bounded and authenticated it
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise bad_request("send the file as multipart form field 'file' (and purpose=fine-tune)", "file")
        folder = upload_folder()
        local = folder / "data.jsonl"
        try:
            size = await run_in_threadpool(_copy_limited, upload, local, limit)
            found = await run_in_threadpool(service.files.add, project, upload.filename or "", str(purpose or ""),
                                            local)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        service.validator.later(project, found.id, local)
        return found.public() | {"bytes": size}

    @app.get("/v1/files")
    def list_files(project: str = Depends(project_of), purpose: str | None = None):
        found = [f.public() for f in service.files.list(project)]
        found += [f for f in (_result_file(service, run, record) for run, record in service.jobs.jobs_of(project))
                  if f is not None]
        found = [f for f in found if purpose is None or f["purpose"] == purpose]
        return {"object": "list", "data": found, "has_more": False}

    @app.get("/v1/files/{file_id}")
    def retrieve_file(file_id: str, project: str = Depends(project_of)):
        result = service.jobs.result_of(project, file_id)
        return objects.result_file(*result) if result else service.files.get(project, file_id).public()

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, project: str = Depends(project_of)):
        result = service.jobs.result_of(project, file_id)
        if result:
            return Response(objects.result_csv(result[0]), media_type="text/csv")
        return Response(service.files.content(project, file_id), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, project: str = Depends(project_of)):
        service.files.delete(project, file_id)
        return {"object": "file", "id": file_id, "deleted": True}


def _copy_limited(upload: UploadFile, target: Path, limit: int) -> int:
    size = 0
    upload.file.seek(0)
    with target.open("wb") as out:
        while chunk := upload.file.read(COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the file is over this server's limit of {limit:,} bytes", "file",
                               "file_too_large")
            out.write(chunk)
    return size


def _result_file(service: Service, run, record) -> dict | None:
    """The job's result file once it has metrics; a finished job's is made once (its metrics no longer change)."""
    def made() -> dict | None:
        return objects.result_file(run, record) if run.exists(METRICS) else None

    service.jobs.known_state(run)  # run.json, read unless the job is known to have finished
    finished = service.jobs.index.finished(run.run_id)
    return service.jobs.index.made_once(run.run_id, "result_file", finished, made) if finished else made()


# ── fine-tuning jobs ────────────────────────────────────────────────────────────────────────────────────────

def _job_routes(app: FastAPI, service: Service, project_of) -> None:
    jobs = service.jobs

    def job(run, record) -> dict:
        """The job object, from run.json read now; a finished job's is made once from its files (they no longer
        change while run.json reads the same)."""
        info = jobs.status(run)
        return jobs.index.made_once(run.run_id, "job", info, lambda: objects.job_object(run, record, info))

    @app.post("/v1/fine_tuning/jobs")
    def create_job(body: JobRequest, project: str = Depends(project_of)):
        run = jobs.create(project, body)
        return job(run, jobs.record(run))

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, project: str = Depends(project_of), after: str | None = None, limit: int = 20):
        wanted = {key[len("metadata["):-1]: value for key, value in request.query_params.items()
                  if key.startswith("metadata[") and key.endswith("]")}
        owned = [(run, record) for run, record in jobs.jobs_of(project)
                 if all(record.metadata.get(k) == v for k, v in wanted.items())]
        shown = _after(owned, after, lambda item: item[1].job_id)[:_limit(limit) + 1]
        # Only the page's jobs are read (a run.json each); the one beyond it only says there is more.
        return {"object": "list", "data": [job(*item) for item in shown[:limit]], "has_more": len(shown) > limit}

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve_job(job_id: str, project: str = Depends(project_of)):
        return job(*jobs.owned(project, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, project: str = Depends(project_of)):
        run, record = jobs.owned(project, job_id)
        jobs.cancel(run)
        return job(run, record)

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str, project: str = Depends(project_of)):
        run, record = jobs.owned(project, job_id)
        jobs.pause(run)
        return job(run, record)

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str, project: str = Depends(project_of)):
        run, record = jobs.owned(project, job_id)
        jobs.resume(run)
        return job(run, record)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, project: str = Depends(project_of), after: str | None = None, limit: int = 20):
        run, _ = jobs.owned(project, job_id)
        newest_first = list(reversed(objects.events(run)))
        return _page(_after(newest_first, after, lambda e: e["id"])[:_limit(limit) + 1], limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, project: str = Depends(project_of), after: str | None = None,
                         limit: int = 10):
        run, record = jobs.owned(project, job_id)
        found = objects.checkpoints(run, record)
        return _page(_after(found, after, lambda c: c["id"])[:_limit(limit) + 1], limit)


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise bad_request(f"limit must be between 1 and 100 (got {limit})", "limit")
    return limit


def _after(items: list, after: str | None, ident) -> list:
    """The items after the one whose id is ``after`` (cursor pagination); all of them without a cursor."""
    if after is None:
        return items
    ids = [ident(item) for item in items]
    if after not in ids:
        raise bad_request(f"after={after!r} is not an id of this list", "after")
    return items[ids.index(after) + 1:]


def _page(items: list[dict], limit: int) -> dict:
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


# ── models ──────────────────────────────────────────────────────────────────────────────────────────────────

def _model_routes(app: FastAPI, service: Service, project_of) -> None:
    def models(project: str) -> list[dict]:
        created = int(service.served.loaded_at)
        callable_now = service.gateway.callable  # tunerun's own field: whether chat/completions would answer now
        found = [{"id": name, "object": "model", "created": created, "owned_by": "tunerun",
                  "tunerun": {"callable": callable_now(name)}} for name in service.served.config.models_of(project)]
        for run, record in service.jobs.jobs_of(project):
            if service.jobs.known_state(run) == "succeeded":
                found.append({"id": objects.fine_tuned_model(record), "object": "model",
                              "created": int(record.created_at), "owned_by": project,
                              "tunerun": {"callable": callable_now(record.model, run)}})
        return found

    @app.get("/v1/models")
    def list_models(project: str = Depends(project_of)):
        return {"object": "list", "data": models(project)}

    @app.get("/v1/models/{model_id:path}")
    def retrieve_model(model_id: str, project: str = Depends(project_of)):
        found = checkpoint_model(model_id, project) if CHECKPOINT_MODEL.fullmatch(model_id) else \
            next((m for m in models(project) if m["id"] == model_id), None)
        if found is None:
            raise not_found("model", model_id, "model")
        return found

    def checkpoint_model(model_id: str, project: str) -> dict | None:
        """A checkpoint's model (``checkpoints.list`` names them): its owner's while the checkpoint is complete."""
        job_id = CHECKPOINT_MODEL.fullmatch(model_id).group("job")
        try:
            run, record = service.jobs.owned(project, job_id)
        except ApiError:
            return None
        found = next((c for c in objects.checkpoints(run, record) if c["fine_tuned_model_checkpoint"] == model_id),
                     None)
        return {"id": model_id, "object": "model", "created": found["created_at"], "owned_by": project} \
            if found else None


# ── tunerun's own: what a job produced ──────────────────────────────────────────────────────────────────────

def _outcome_routes(app: FastAPI, service: Service, project_of) -> None:
    jobs = service.jobs

    @app.get("/v1/fine_tuning/jobs/{job_id}/evaluation")
    def job_evaluation(job_id: str, project: str = Depends(project_of)):
        run, _ = jobs.owned(project, job_id)
        return outcomes.evaluation(run, job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/data_report")
    def job_data_report(job_id: str, project: str = Depends(project_of)):
        run, _ = jobs.owned(project, job_id)
        return outcomes.data_report(run, job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/report")
    def job_report(job_id: str, project: str = Depends(project_of)):
        run, _ = jobs.owned(project, job_id)
        if not run.exists(REPORT):
            raise ApiError(404, f"Job {job_id} has no report yet: it is written when the run ends",
                           "fine_tuning_job_id", "not_ready")
        return Response(run.read_bytes(REPORT), media_type="text/html",
                        headers={"content-security-policy": REPORT_POLICY})

    @app.get("/v1/fine_tuning/jobs/{job_id}/artifacts")
    def list_artifacts(job_id: str, project: str = Depends(project_of)):
        run, _ = jobs.owned(project, job_id)
        return {"object": "list", "data": outcomes.artifacts(run, job_id), "has_more": False}

    @app.get("/v1/fine_tuning/jobs/{job_id}/artifacts/{artifact_id}")
    def download_artifact(job_id: str, artifact_id: str, project: str = Depends(project_of)):
        run, _ = jobs.owned(project, job_id)
        found = outcomes.artifact(run, job_id, artifact_id)
        name = f"{job_id}-{artifact_id}"
        return StreamingResponse(stream_tar(run, found["path"], name), media_type="application/x-tar",
                                 headers={"content-disposition": f'attachment; filename="{name}.tar"'})

    @app.get("/v1/fine_tuning/compare")
    def compare_jobs(job_ids: str, project: str = Depends(project_of)):
        wanted = [j for j in job_ids.split(",") if j]
        if len(wanted) < 2:
            raise bad_request("name two or more jobs to compare: job_ids=ftjob-…,ftjob-…", "job_ids")
        owned = [jobs.owned(project, job_id) for job_id in wanted]
        result = compare.compare([run for run, _ in owned]).to_json()
        # the files' place in the storage is the server's business
        uploads = service.files.data_uri(project, "f").removesuffix("f.jsonl")
        for summary, (_, record) in zip(result["runs"], owned):
            summary["eval_set"] = summary["eval_set"].replace(uploads, "")
            summary.update(suffix=record.suffix, model=record.model, hyperparameters=record.hyperparameters
                           | {"seed": record.seed}, result_file=record.result_file)
        return {"object": "fine_tuning.comparison", **result}

    @app.get("/v1/usage")
    def project_usage(project: str = Depends(project_of), since: int | None = None):
        """tunerun's own, not OpenAI's: the project's jobs by status, trained tokens and worker-hours (GPU-hours),
        from ``since`` (a Unix time) on, else ever (`tunerun.jobs.service.usage`)."""
        found = usage.usage_by_project(jobs, project, since)[project]
        return {"object": "tunerun.usage", "since": since, **found.to_json()}


# ── errors ──────────────────────────────────────────────────────────────────────────────────────────────────

def _error_handlers(app: FastAPI) -> None:
    respond = error_response

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = [str(part) for part in first["loc"] if part not in ("body", "query", "path")]
        param = ".".join(where) or None
        if first["type"] == "json_invalid":
            return respond(bad_request(f"the request body is not valid JSON: {first['msg']}", None, "invalid_json"))
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown parameter"
        return respond(bad_request(f"{param}: {message}" if param else message, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return respond(ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(OSError)
    async def storage_error(request, exc: OSError):
        if not is_disk_full(exc):
            return await internal_error(request, exc)
        logger.error("storage full on %s %s: %s", request.method, request.url.path, exc)
        return respond(ApiError(507, "The server's storage is full, so nothing was stored; what was there before is "
                                     "unchanged and can still be read. Try again once your platform team has freed "
                                     "space.", code="storage_full"))

    @app.exception_handler(TunerunError)
    async def tunerun_error(request, exc: TunerunError):
        logger.warning("%s %s refused: %s", request.method, request.url.path, exc)  # the admin's log has it whole
        return respond(bad_request(tenant_text(str(exc))))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)  # the path, never a header
        return respond(ApiError(500, f"internal error ({type(exc).__name__}); the server's log has the details",
                                code="internal_error"))

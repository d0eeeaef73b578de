"""OpenAI's ``/v1/chat/completions`` and ``/v1/completions`` for the catalog models and a project's fine-tunes.

The gateway resolves ``model`` within the caller's project (another project's fine-tune is 404 ``model_not_found``,
exactly as a missing one), checks what the engine would refuse late (``n``, ``max_tokens`` beyond the context), has
the adapter loaded, and forwards to the model's engine (`tunerun.jobs.service.engines`); a full fine-tune has an engine
of its own, started on demand (`tunerun.jobs.service.full_engines`). An adapter goes to the engine of the weights it
was trained on, which its run's job.yaml names (``model.path``): the catalog model's, or — for a LoRA job trained on
top of a full fine-tune, e.g. one created from its ``ft:`` model — that full fine-tune's own engine. A chat request
is rendered here with the chat template saved beside the run's weights (`tunerun.jobs.service.chat`) and sent as a
completion, so the engine tokenizes the prompt as training did; the answer comes back in chat's shape. Streams are
passed on as they arrive; when the client goes away the stream to the engine is closed, and vLLM aborts the request.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tunerun.cluster.run_folder import ADAPTER_CONFIG, CHAT_TEMPLATE, JOB, TOKENIZER_CONFIG, RunFolder, final_weights, \
    read_job
from tunerun.cluster.storage import cache_root
from tunerun.jobs.errors import UnreadableJob
from tunerun.jobs.service.chat import ChatTemplate, TemplateRefused
from tunerun.jobs.service.checkpoint_adapters import NoCheckpoint, NotAnAdapter, checkpoint_adapter
from tunerun.jobs.service.engine_files import copy_prefix
from tunerun.jobs.service.engines import Engine, ManagedEngine, Unavailable, adapter_key
from tunerun.jobs.service.errors import ApiError, bad_request, tenant_text
from tunerun.jobs.service.fine_tuning import CHECKPOINT_MODEL, JOB_ID, fine_tuned_model
from tunerun.jobs.service.k8s_engines import KubernetesEngines, full_fine_tune_engines
from tunerun.jobs.service.gate import CHAT_PATH, CHAT_RENDER_PATH, COMPLETIONS_PATH

# What a chat request passes on to the completion it becomes (the rest of OpenAI's chat parameters are refused
# when set, rather than silently ignored).
SAMPLING = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user",
            "top_k", "min_p", "repetition_penalty", "min_tokens", "stream_options")
UNSUPPORTED_CHAT = ("logprobs", "top_logprobs", "tool_choice", "response_format", "parallel_tool_calls",
                    "audio", "modalities", "prediction")
STREAM_TIMEOUT = httpx.Timeout(None, connect=10.0)  # a long generation is not a timeout; a dead engine is seen
REQUEST_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id travel to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    tools: list[dict] | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stream: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's and vLLM's sampling parameters go to the engine
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stream: bool = False


@dataclass(frozen=True)
class Route:
    """Where a request for ``requested`` goes: the engine, the name the engine knows it by, the adapter it needs
    loaded first (name, path as the engine reads it) and the chat template its prompts are rendered with."""

    requested: str
    engine: Engine
    served: str
    adapter: tuple[str, str] | None
    template: ChatTemplate


class Gateway:
    def __init__(self, service, engines: dict[str, Engine]):
        self.service, self.engines = service, engines
        self.limits = service.served.config.inference
        self.client: httpx.AsyncClient | None = None
        self._templates: dict[str, ChatTemplate] = {}  # a catalog model's
        self._adapters: dict[str, tuple[str, ChatTemplate]] = {}  # a job's: where the engine reads it, its template
        self.full = full_fine_tune_engines(service.served.config)  # processes here, or Kubernetes objects
        self._full_templates: dict[str, ChatTemplate] = {}  # a full fine-tune's, by job id
        self._is_full: dict[str, bool] = {}  # by job id: a succeeded job's weights never change kind
        self._trained_on: dict[str, str | None] = {}  # by job id: the full fine-tune an adapter was trained on
        self._copying = threading.Lock()  # one copy of a full fine-tune's weights at a time

    async def open(self) -> None:
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        for engine in self.engines.values():
            engine.start()
        self.full.start()

    async def close(self) -> None:
        # side by side: each engine can take seconds to stop, and the server's stop waits for all of them
        await asyncio.gather(run_in_threadpool(self.full.close),
                             *(run_in_threadpool(engine.stop) for engine in self.engines.values()))
        if self.client is not None:
            await self.client.aclose()

    def health(self) -> dict:
        """Each catalog model's engine, and each full fine-tune's (by job id) started since the server started."""
        return {**{name: engine.health() for name, engine in self.engines.items()}, **self.full.health()}

    def callable(self, base: str, run=None) -> bool:
        """Whether a request for ``base`` or its fine-tune in ``run`` would reach an engine that serves now (a full
        fine-tune, and an adapter trained on one: the full fine-tune's own engine)."""
        if run is not None and self._full_fine_tune(run):
            return self.full.ready(run.run_id)
        engine = self.engines.get(base)
        try:
            if run is not None and (under := self._full_fine_tune_under(run)):
                return self.full.ready(under)
            return engine is not None and engine.check_ready() is None
        except (Unavailable, ApiError):
            return False

    # ── which model, where ──────────────────────────────────────────────────────────────────────────────────

    def route(self, project: str, model: str) -> Route:
        if model in self.service.served.config.models_of(project):
            engine = self._engine(model, model)
            return Route(model, engine, model, None, self._base_template(model))
        checkpoint = CHECKPOINT_MODEL.fullmatch(model)
        step = int(checkpoint["step"]) if checkpoint else None
        found = self.service.jobs.fine_tuned(project, checkpoint["model"] if checkpoint else model)
        if found is None:
            raise _model_not_found(model)
        run, record = found
        job_id = record.job_id
        state = self.service.jobs.known_state(run)
        if state != "succeeded":
            raise ApiError(409, f"{model} cannot be called yet: its fine-tuning job is {state.value}; it can be once "
                                "the job has succeeded", "model", "model_not_ready")
        engine = self._engine(record.model, model)
        if self._full_fine_tune(run):
            return self._full_route(run, record.model, engine, model, step)
        under = self._full_fine_tune_under(run)
        if under is not None:
            engine = self._under_full_engine(under, record.model, engine, model)
        # A succeeded job's weights do not change: where the engine reads them is looked up once; so is a checkpoint's.
        served = f"{job_id}-step-{step}" if step is not None else job_id
        if served not in self._adapters:
            self._adapters[served] = self._adapter(run, engine, model, served, step)
        path, template = self._adapters[served]
        return Route(model, engine, served, (served, path), template)

    def _adapter(self, run, engine: Engine, model: str, served: str, step: int | None) -> tuple[str, ChatTemplate]:
        """Where the engine reads the job's adapter (a checkpoint's at ``step``), and the chat template the job
        trained with."""
        final = final_weights("adapter")
        adapter = final
        if step is not None:
            try:
                adapter = checkpoint_adapter(run, step)
            except NoCheckpoint:
                raise _model_not_found(model) from None
            except NotAnAdapter as exc:
                raise ApiError(400, f"{model}: {tenant_text(str(exc))}", "model", "model_not_served") from None
        local = run.local_path(adapter) if run.is_local else \
            self._local_copy(run, adapter, served) if isinstance(engine, ManagedEngine) else None
        path = engine.adapter_path(str(local) if local else None, adapter_key(run.run_id, adapter))
        return path, _run_template(run, final)

    def _full_fine_tune(self, run) -> bool:
        """Whether the (succeeded) job in ``run`` is a full fine-tune: its final weights are not an adapter."""
        if run.run_id not in self._is_full:
            self._is_full[run.run_id] = not run.exists(f"{final_weights('adapter')}/{ADAPTER_CONFIG}")
        return self._is_full[run.run_id]

    def _full_route(self, run, base: str, engine: Engine, model: str, step: int | None) -> Route:
        """A full fine-tune goes to an engine of its own, which needs its catalog model's engine to be managed."""
        if step is not None:
            raise ApiError(400, f"{model}: the checkpoints of a full fine-tune are not served (each would need an "
                                "engine of its own); call the fine-tuned model, or export the checkpoint (tunerun "
                                "export RUN --checkpoint N) and serve it with your own vLLM", "model",
                           "model_not_served")
        refused = f"{model} is a full fine-tune, which is served by an engine of its own that this server starts"
        own = self._own_engine(run, base, engine, refused)
        if run.run_id not in self._full_templates:
            self._full_templates[run.run_id] = _run_template(run, final_weights("model"))
        return Route(model, own, run.run_id, None, self._full_templates[run.run_id])

    def _own_engine(self, run, base: str, engine: Engine, refused: str) -> Engine:
        """The engine of the full fine-tune in ``run`` (of catalog model ``base``, whose engine is ``engine``); 400
        ``model_not_served`` where this server cannot start one, the message led by ``refused``."""
        if isinstance(self.full, KubernetesEngines) and self.full.serves(base):  # objects, not a process
            return self.full.engine(run.run_id, base)
        if not isinstance(engine, ManagedEngine):
            raise ApiError(400, f"{refused}, and {base}'s engine is external (inference.engines.{base}.external): this "
                                f"server starts no process for it. Give {base} a managed engine, or serve the "
                                "fine-tune's weights with your own vLLM", "model", "model_not_served")
        if self.full.settings is None:
            raise ApiError(400, f"{refused}, and this server starts none: its admin turns them on with "
                                "inference.full_fine_tunes: {max_engines, idle_stop_s} in server.yaml", "model",
                           "model_not_served")
        return self.full.engine(run.run_id, base, engine.settings, lambda: self._local_model(run), engine.log.parent)

    def _full_fine_tune_under(self, run) -> str | None:
        """The job id of the full fine-tune whose weights the (succeeded, adapter) job in ``run`` trained on: its
        job.yaml's ``model.path`` is that run's ``final/model`` in this server's storage. None: it trained on its
        catalog model (a run with no job.yaml, written by hand, is taken as such)."""
        if run.run_id not in self._trained_on:
            try:
                self._trained_on[run.run_id] = _full_fine_tune_under(run) if run.exists(JOB) else None
            except UnreadableJob as exc:  # which weights it needs is not known: serving it on a guess could be wrong
                raise ApiError(400, f"{fine_tuned_model(self.service.jobs.record(run))} cannot be served: "
                                    f"{tenant_text(str(exc))}", "model", "model_not_served") from None
        return self._trained_on[run.run_id]

    def _under_full_engine(self, under: str, base: str, engine: Engine, model: str) -> Engine:
        """The engine an adapter trained on the full fine-tune ``under`` is loaded into: that fine-tune's own."""
        found = self.service.jobs.index.find(under)
        refused = (f"{model} is an adapter trained on the full fine-tune "
                   f"{fine_tuned_model(found[1]) if found else under}, so it is served on that model's own engine, "
                   "which this server starts")
        gone = found is None or self.service.jobs.known_state(found[0]) != "succeeded"
        if gone or not self._full_fine_tune(found[0]):
            raise ApiError(400, f"{refused}; its weights are no longer there to serve", "model", "model_not_served")
        return self._own_engine(found[0], base, engine, refused)

    def _local_model(self, run) -> str:
        """The folder of a full fine-tune's weights on this host, which a managed engine reads: one on S3 is copied
        into the cache once, whole or not at all (called by the engine as it starts)."""
        weights = final_weights("model")
        if run.is_local:
            return str(run.local_path(weights).absolute())
        root = cache_root() / "serve" / "models"
        target = root / run.run_id
        with self._copying:
            if not target.is_dir():
                (root / ".incoming").mkdir(parents=True, exist_ok=True)
                copy_prefix(run.backend, adapter_key(run.run_id, weights), target, root / ".incoming")
        return str(target)

    def _engine(self, base: str, requested: str) -> Engine:
        engine = self.engines.get(base)
        if engine is None:
            raise ApiError(404, f"The model `{requested}` is not served by this server: its base {base} has no "
                                "inference engine (server.yaml inference.engines)", "model", "model_not_found")
        return engine

    def _local_copy(self, run, adapter: str, served: str) -> Path:
        """A managed engine reads adapters from this host: one on S3 is copied into the cache once."""
        target = cache_root() / "serve" / "adapters" / served
        if not (target / ADAPTER_CONFIG).is_file():
            run.download_dir(adapter, target)
        return target

    def _base_template(self, model: str) -> ChatTemplate:
        if model not in self._templates:
            folder = Path(self.service.served.templates[model].model.path)
            self._templates[model] = ChatTemplate.of_weights(_text_file(folder / CHAT_TEMPLATE),
                                                             _json_file(folder / TOKENIZER_CONFIG))
        return self._templates[model]

    # ── checks the engine would make late ───────────────────────────────────────────────────────────────────

    def check(self, route: Route, n: int, max_tokens: int | None) -> None:
        if n > self.limits.max_n:
            raise bad_request(f"n is {n}; this server returns at most {self.limits.max_n} choices per request", "n")
        if max_tokens is not None and max_tokens >= route.engine.max_model_len:
            raise bad_request(f"max_tokens is {max_tokens}, and {route.requested}'s context is "
                              f"{route.engine.max_model_len} tokens for prompt and completion together; ask for "
                              "fewer", "max_tokens", "context_length_exceeded")

    # ── forwarding ──────────────────────────────────────────────────────────────────────────────────────────

    async def forward(self, request: Request, route: Route, body: dict, stream: bool, to_chat: bool):
        engine = route.engine
        try:
            engine.begin()  # counted in flight until released below (a stream: until its last event)
        except Unavailable as exc:
            raise _unavailable(str(exc), exc.retry_after) from None
        try:
            return await self._forward(request, route, body, stream, to_chat)
        finally:
            engine.release()

    async def _forward(self, request: Request, route: Route, body: dict, stream: bool, to_chat: bool):
        engine = route.engine
        try:
            if route.adapter:
                await engine.ensure_adapter(self.client, *route.adapter)
            sending = self.client.send(
                self.client.build_request("POST", engine.url + "/v1/completions", json=body, headers=engine.headers,
                                          timeout=STREAM_TIMEOUT if stream else REQUEST_TIMEOUT), stream=True)
            # vLLM answers a whole completion's headers only once it is generated: wait for it unless the client goes
            upstream = await (sending if stream else _unless_gone(request, sending))
        except Unavailable as exc:
            raise _unavailable(str(exc), exc.retry_after) from None
        except httpx.HTTPError as exc:
            raise _unavailable(f"the engine for {engine.model} is unreachable ({type(exc).__name__})", 5) from None
        if upstream.status_code != 200:
            text = (await upstream.aread()).decode("utf-8", "replace")
            await upstream.aclose()
            raise _engine_error(upstream.status_code, text)
        if stream:
            return StreamingResponse(self._events(upstream, route, to_chat), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        try:
            answer = json.loads(await upstream.aread())
        except (httpx.HTTPError, ValueError):
            raise _unavailable(f"the engine for {engine.model} stopped before answering", 5) from None
        finally:
            await upstream.aclose()
        answer["model"] = route.requested
        return JSONResponse(as_chat(answer) if to_chat else answer)

    async def _events(self, upstream: httpx.Response, route: Route, to_chat: bool) -> AsyncIterator[str]:
        """The engine's server-sent events with the caller's model name (reshaped for chat); an error event if the
        engine dies. A completion's chunk is passed on as text, renamed in place: on a machine the engine shares,
        parsing and writing every token's JSON again costs the engine CPU."""
        opened: set[int] = set()
        served = re.compile(r'"model":\s*' + re.escape(json.dumps(route.served)))
        renamed = '"model":' + json.dumps(route.requested)
        route.engine.hold()  # a stream is in flight until its end (`forward` released the request it began)
        try:
            async for line in upstream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    yield "data: [DONE]\n\n"
                    return
                if data.startswith('{"error"') or data.startswith('{"object":"error"'):
                    yield f"data: {json.dumps(_error_body(json.loads(data)))}\n\n"
                    return
                if to_chat:
                    chunk = json.loads(data) | {"model": route.requested}
                    yield f"data: {json.dumps(as_chat_chunk(chunk, opened))}\n\n"
                else:
                    yield f"data: {served.sub(lambda _: renamed, data, count=1)}\n\n"  # as is, not a template
            raise httpx.RemoteProtocolError("the stream ended without [DONE]")
        except (httpx.HTTPError, ValueError) as exc:
            message = f"the engine stopped in the middle of this response ({type(exc).__name__}); try again"
            error = {"message": message, "type": "server_error", "code": "engine_failed", "param": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            # A client that went away lands here inside a cancelled scope, where an unshielded await would be
            # cancelled before the connection closed, and vLLM would generate on for nobody.
            route.engine.release()
            with anyio.CancelScope(shield=True):
                await upstream.aclose()


async def _unless_gone(request: Request, reading):
    """``await reading``, abandoned when the client disconnects first (`ClientGone`). The body was read already, so
    the next ASGI message is the disconnect, as Starlette's streaming responses listen for it."""
    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(reading), asyncio.ensure_future(disconnect())
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        gone.cancel()
        return task.result()
    task.cancel()
    raise ClientGone()


class ClientGone(httpx.HTTPError):
    def __init__(self):
        super().__init__("the client went away")


# ── OpenAI's shapes ─────────────────────────────────────────────────────────────────────────────────────────

def completion_body(request: ChatRequest, route: Route) -> dict:
    """The completion a chat request becomes: the rendered prompt and the sampling parameters it set."""
    set_fields = request.model_dump(exclude_unset=True)
    refused = [name for name in UNSUPPORTED_CHAT if set_fields.get(name) not in (None, False)]
    if refused:
        raise bad_request(f"{refused[0]} is not supported by this server's chat completions", refused[0],
                          "unsupported_parameter")
    messages = [_plain(message) for message in request.model_dump(exclude_none=True)["messages"]]
    try:
        prompt = route.template.render(messages, request.tools)
    except TemplateRefused as exc:
        raise bad_request(str(exc), "messages") from None
    body = {"model": route.served, "prompt": prompt, "n": request.n, "stream": request.stream}
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body | {name: set_fields[name] for name in SAMPLING if name in set_fields}


def _plain(message: dict) -> dict:
    """Content parts (``[{"type": "text", "text": …}]``) joined into the string a text template renders."""
    content = message.get("content")
    if isinstance(content, list):
        if any(part.get("type") != "text" for part in content):
            raise bad_request("only text content parts can be sent to these models", "messages")
        message = message | {"content": "".join(str(part.get("text", "")) for part in content)}
    if message.get("role") == "developer":
        message = message | {"role": "system"}  # OpenAI's newer name for the system turn
    return message | {"content": message.get("content") or ""}


def as_chat(answer: dict) -> dict:
    return {"id": "chatcmpl-" + str(answer.get("id", "")).removeprefix("cmpl-"), "object": "chat.completion",
            "created": answer.get("created", int(time.time())), "model": answer["model"],
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c.get("text", "")},
                         "finish_reason": c.get("finish_reason"), "logprobs": None} for c in answer["choices"]],
            "usage": answer.get("usage"), "system_fingerprint": None}


def as_chat_chunk(chunk: dict, opened: set[int]) -> dict:
    choices = []
    for choice in chunk.get("choices", []):
        delta = {"content": choice.get("text", "")}
        if choice["index"] not in opened:
            opened.add(choice["index"])
            delta = {"role": "assistant", **delta}
        choices.append({"index": choice["index"], "delta": delta, "finish_reason": choice.get("finish_reason"),
                        "logprobs": None})
    shaped = {"id": "chatcmpl-" + str(chunk.get("id", "")).removeprefix("cmpl-"), "object": "chat.completion.chunk",
              "created": chunk.get("created", int(time.time())), "model": chunk["model"], "choices": choices}
    if chunk.get("usage"):
        shaped["usage"] = chunk["usage"]
    return shaped


def _error_body(answer: dict) -> dict:
    error = answer.get("error") if isinstance(answer.get("error"), dict) else answer
    return {"error": {"message": str(error.get("message", "the engine refused the request")),
                      "type": error.get("type") or "invalid_request_error", "param": error.get("param"),
                      "code": error.get("code")}}


def _engine_error(status: int, text: str) -> ApiError:
    try:
        error = _error_body(json.loads(text))["error"]
    except ValueError:
        error = {"message": text[:500] or "the engine refused the request", "param": None, "code": None}
    if 400 <= status < 500:
        return ApiError(400 if status == 422 else status, error["message"], error.get("param"),
                        error.get("code") or "invalid_request")
    return _unavailable(f"the engine failed this request ({status}): {error['message'][:300]}", 5)


def _unavailable(message: str, retry_after: int | None) -> ApiError:
    error = ApiError(503, tenant_text(message), None, "engine_unavailable")  # an engine's log line names paths
    error.headers = {"retry-after": str(retry_after)} if retry_after else {}
    return error


def _model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.", "model",
                    "model_not_found")


def _full_fine_tune_under(run) -> str | None:
    """`Gateway._full_fine_tune_under`, read from the run's job.yaml."""
    trained_on = read_job(run).spec.model.path.rstrip("/")
    weights = final_weights("model")
    folder, ends, rest = trained_on.rpartition(f"/{weights}")
    under = folder.rsplit("/", 1)[-1]
    if not ends or rest or not JOB_ID.fullmatch(under):
        return None
    full = RunFolder(run.storage, under).uri(weights)
    same = Path(full).resolve() == Path(trained_on).resolve() if run.is_local else full == trained_on
    return under if same else None


def _run_template(run, weights: str) -> ChatTemplate:
    """The chat template the job trained with, saved beside its weights (``weights``: final/adapter, final/model)."""
    template = run.read_text(f"{weights}/{CHAT_TEMPLATE}") if run.exists(f"{weights}/{CHAT_TEMPLATE}") else None
    return ChatTemplate.of_weights(template, run.read_json_if_there(f"{weights}/{TOKENIZER_CONFIG}", {}))


def _json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _text_file(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


# ── routes ──────────────────────────────────────────────────────────────────────────────────────────────────

def inference_routes(app: FastAPI, gateway: Gateway, project_of) -> None:
    @app.post(CHAT_PATH)
    async def chat_completions(request: ChatRequest, http: Request, project: str = Depends(project_of)):
        route = await run_in_threadpool(gateway.route, project, request.model)
        gateway.check(route, request.n, request.max_completion_tokens or request.max_tokens)
        return await gateway.forward(http, route, completion_body(request, route), request.stream, to_chat=True)

    @app.post(COMPLETIONS_PATH)
    async def completions(request: CompletionRequest, http: Request, project: str = Depends(project_of)):
        route = await run_in_threadpool(gateway.route, project, request.model)
        gateway.check(route, request.n, request.max_tokens)
        body = request.model_dump(exclude_unset=True) | {"model": route.served, "stream": request.stream}
        return await gateway.forward(http, route, body, request.stream, to_chat=False)

    @app.post(CHAT_RENDER_PATH, include_in_schema=False)
    async def render_chat(request: ChatRequest, project: str = Depends(project_of)):
        """tunerun's own: the prompt text the model sees for these messages (the playground's template view)."""
        route = await run_in_threadpool(gateway.route, project, request.model)
        return {"model": request.model, "prompt": completion_body(request, route)["prompt"]}

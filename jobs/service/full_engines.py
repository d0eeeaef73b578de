"""Full fine-tunes' own engines: one vLLM per fine-tuned model, started by its first request, stopped when idle.

A full fine-tune (``method.kind: full``) has no adapter to load into its catalog model's engine: its weights are a
whole model (``final/model``), so it is served by an engine of its own — a managed engine
(`tunerun.jobs.service.engines.ManagedEngine`) with the settings of its catalog model's managed engine (python,
ports, dtype, context, memory, ``extra_args``) and the run's weights as ``--model``. It runs with LoRA on, as the
catalog model's does: a LoRA or QLoRA job trained on top of the full fine-tune (its ``model.path`` is the run's
``final/model``, e.g. a job created from the ``ft:`` model) is served by loading its adapter into this engine — on
the catalog model's engine it would meet the wrong base weights. So the catalog engine's LoRA options in
``extra_args`` (``--max-cpu-loras``, ``--lora-dtype``…) hold here too, and the engine's command is the catalog
engine's with another ``--model``. vLLM pre-allocates room for ``max_loras`` adapters of ``max_lora_rank`` in
every layer it can adapt, and runs the LoRA kernels on each batch, so an engine with LoRA on costs a little memory
and time even while it serves only the full fine-tune. Such an engine costs what the base's does, so it
runs only while it is used: a request for a fine-tune whose engine is not running starts it (and is 503 with
``Retry-After``, as for any starting engine); an engine that no request has used for ``idle_stop_s`` is stopped; at
most ``max_engines`` run at once — a new one stops the least recently used idle one, and when every one is serving
or starting, the request is 503. A server that starts again runs none: each starts on its next request.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from tunerun.jobs.service.engines import ManagedEngine, ManagedEngineSettings, Unavailable
from tunerun.jobs.spec import Strict

logger = logging.getLogger("tunerun.serve.engines")
IDLE_LOOK_S = 1.0  # how often running engines are checked for idleness (cheap: no I/O)
STARTING_RETRY_S = 10  # Retry-After while an engine starts (a small model on CPU: ~30 s; an 8B on a GPU: ~1 min)
FULL_RETRY_S = 30  # Retry-After when every engine is in use: a request to one of them has to end first
RUNNING = ("starting", "ready", "restarting")  # states that hold a process (or are about to)


class FullFineTuneSettings(Strict):
    """``inference.full_fine_tunes``: serving full fine-tunes, each on an engine of its own that this server starts,
    so only the fine-tunes of a catalog model with a managed engine. Unset: full fine-tunes are not served."""

    max_engines: int = Field(1, ge=1, le=64, description="Their engines running at once, all catalog models together.")
    idle_stop_s: float = Field(600, gt=0, description="An engine no request has used for this long is stopped.")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="Each one's share of a GPU (the "
                                                 "base's engine shares it too); unset: the catalog model's engine's.")
    kv_cache_gib: float | None = Field(None, gt=0, description="CPU engines: VLLM_CPU_KVCACHE_SPACE; unset: the "
                                       "catalog model's engine's.")

    def engine_settings(self, base: ManagedEngineSettings) -> ManagedEngineSettings:
        """The catalog model's managed settings, with this block's memory settings where it sets them."""
        return base.model_copy(update={name: getattr(self, name) for name in ("gpu_memory_utilization", "kv_cache_gib")
                                       if getattr(self, name) is not None})


class PooledEngine:
    """What `FullFineTuneEngines` asks of each of its engines beyond `Engine`'s, the same for a process here
    (`FullFineTuneEngine`) and for Kubernetes objects (`tunerun.jobs.service.k8s_engines.KubernetesFullEngine`):
    requests go through the pool, idleness is measured alike, and stopping (seconds: vLLM's, or the API's) runs in
    a thread of its own. The engine sets ``pool``, ``ready_at`` and ``_stopper`` and has ``stop``."""

    def begin(self) -> None:
        self.pool.begin(self)

    def idle_s(self) -> float:
        """Since a request last began or ended, or since it became ready (a start can outlast ``idle_stop_s``)."""
        return time.monotonic() - max(self.last_used, self.ready_at)

    def retire(self) -> threading.Thread:
        """Stop it in a thread of its own; the thread, to wait for."""
        if self._stopper is None or not self._stopper.is_alive():
            self.state = "stopping"
            self._stopper = threading.Thread(target=self.stop, name=f"stop-{self.model}", daemon=True)
            self._stopper.start()
        return self._stopper


class FullFineTuneEngine(PooledEngine, ManagedEngine):
    """One full fine-tune's engine: the run's weights, served under the job's id, and the adapters trained on them
    loaded at run time, as into a catalog model's engine. `FullFineTuneEngines` starts it (`launch`) and stops it
    (`retire`); a request goes through `begin`, which starts it when it is not running. ``weights`` gives the folder
    vLLM loads, on this host: called when it starts (a run on S3 is copied then, not by a request that only renders
    a prompt)."""

    def __init__(self, job_id: str, base: str, settings: ManagedEngineSettings, weights: Callable[[], str],
                 log_dir: Path, pool: FullFineTuneEngines):
        super().__init__(job_id, settings, "", log_dir)
        self.base, self.weights, self.pool, self.starts = base, weights, pool, 0
        self._stopper: threading.Thread | None = None

    def launch(self, after: list[threading.Thread]) -> None:
        """Start it once the engines stopping to make room for it (``after``) have stopped."""
        self._stop.clear()
        self.state, self.error, self.starts = "starting", None, self.starts + 1

        def supervise() -> None:
            for stopping in after:
                stopping.join()
            try:
                self.model_path = self.weights()
            except Exception as exc:  # the storage: shown in /healthz; the next request tries again
                logger.exception("engine %s: its weights could not be read", self.model)
                self.error, self.state = f"its weights could not be read: {type(exc).__name__}: {exc}", "stopped"
                return
            self._supervise()

        self._thread = threading.Thread(target=supervise, name=f"engine-{self.model}", daemon=True)
        self._thread.start()

    def health(self) -> dict:
        shown = super().health()
        if self.state == "stopped":  # its last process is gone: no address, no pid to show
            shown |= {"url": None, "pid": None}
        return shown | {"kind": "full_fine_tune", "base": self.base, "starts": self.starts,
                        "in_flight": self.in_flight, "idle_s": round(self.idle_s()),
                        "idle_stop_s": self.pool.settings.idle_stop_s}


class FullFineTuneEngines:
    """The full fine-tunes' engines of one server: at most ``max_engines`` running, each stopped after
    ``idle_stop_s`` without a request. One lock guards which engines run; stopping one happens outside it."""

    def __init__(self, settings: FullFineTuneSettings | None):
        self.settings = settings
        self._engines: dict[str, FullFineTuneEngine] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    def engine(self, job_id: str, base: str, base_settings: ManagedEngineSettings, weights: Callable[[], str],
               log_dir: Path) -> FullFineTuneEngine:
        """The job's engine, running or not (its first request starts it)."""
        with self._lock:
            if job_id not in self._engines:
                self._engines[job_id] = FullFineTuneEngine(job_id, base, self.settings.engine_settings(base_settings),
                                                           weights, log_dir, self)
            return self._engines[job_id]

    def begin(self, engine: FullFineTuneEngine) -> None:
        """A request for ``engine``'s model: counted if it serves now, else `Unavailable` (and started if it was not
        running)."""
        with self._lock:
            if self._closed.is_set():
                raise Unavailable("the server is stopping", 5)
            if engine.state == "stopped":
                engine.launch(self._make_room(engine))
                logger.info("engine %s (a full fine-tune of %s) started by a request", engine.model, engine.base)
                raise Unavailable(f"the engine of {engine.model} (a full fine-tune has an engine of its own) was not "
                                  "running; this request started it: try again shortly", STARTING_RETRY_S)
            engine.check_ready()
            engine.hold()

    def _make_room(self, engine: FullFineTuneEngine) -> list[threading.Thread]:
        """What ``engine`` waits for before it starts: the engines stopping now, and the least recently used idle one
        if ``max_engines`` run. `Unavailable` when every running one is in use or starting (its client waits)."""
        stopping = [e._stopper for e in self._engines.values() if e.state == "stopping" and e._stopper is not None]
        running = [e for e in self._engines.values() if e.state in RUNNING]
        if len(running) < self.settings.max_engines:
            return stopping
        idle = [e for e in running if e.in_flight == 0 and e.state != "starting"]
        if not idle:
            raise Unavailable(f"the engine of {engine.model} cannot start now: this server runs at most "
                              f"{self.settings.max_engines} engine(s) for full fine-tunes at once "
                              "(inference.full_fine_tunes.max_engines), and each is serving requests or starting; "
                              "try again shortly", FULL_RETRY_S)
        evicted = min(idle, key=lambda e: e.last_used)
        logger.info("engine %s: stopped (least recently used) to make room for %s", evicted.model, engine.model)
        return [*stopping, evicted.retire()]

    def health(self) -> dict:
        """Each engine started since the server started, running or stopped."""
        with self._lock:
            engines = [e for e in self._engines.values() if e.starts]
        return {engine.model: engine.health() for engine in engines}

    def ready(self, job_id: str) -> bool:
        engine = self._engines.get(job_id)
        return engine is not None and engine.state == "ready"

    # ── the idle stop ───────────────────────────────────────────────────────────────────────────────────────

    def start(self) -> None:
        if self.settings is not None:
            self._watcher = threading.Thread(target=self._watch, name="full-engines-idle", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._closed.wait(IDLE_LOOK_S):
            with self._lock:
                for engine in self._engines.values():
                    # a starting engine is left alone: its first client is waiting for it
                    if engine.state in ("ready", "restarting") and engine.in_flight == 0 \
                            and engine.idle_s() >= self.settings.idle_stop_s:
                        logger.info("engine %s: stopped after %.0f s without a request", engine.model,
                                    engine.idle_s())
                        engine.retire()

    def close(self) -> None:
        """Stop every engine (the server stops)."""
        self._closed.set()
        with self._lock:
            stopping = [engine.retire() for engine in self._engines.values() if engine.state != "stopped"]
        for thread in stopping:
            thread.join()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

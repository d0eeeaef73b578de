"""Full fine-tunes' own engines on Kubernetes: a vLLM Deployment and Service per fine-tune, made by the server.

On one host a full fine-tune is served by a vLLM process of its own that the server starts on its first request and
stops when idle (`tunerun.jobs.service.full_engines`). Deployed by `tunerun serve render`, the server runs in a pod
and starts no process: its pool of full fine-tune engines is the same (`FullFineTuneEngines`: at most
``max_engines``, the least recently used idle one makes room, one idle ``idle_stop_s`` goes), but each engine is a
Deployment and a Service in the server's namespace (``k8s/serve-full-engine.yaml.j2``, rendered by
`tunerun.jobs.service.deploy.full_engine_manifests` with the settings of its catalog model's engine): launching it
creates them, retiring it deletes them. A request is 503 with ``Retry-After`` until the Service answers ``/health``.

The objects carry ``app.kubernetes.io/component: vllm-full-fine-tune`` and the job's id (``tunerun/job-id``), and are
owned by the server's Deployment, so deleting the server deletes them. A server that stops leaves them running (a
rolling update of the server pod would otherwise drop every engine); the server that starts next finds them by label
and adopts those it would have made itself, up to ``max_engines`` (newest first), deleting the rest: an engine
whose catalog model is no longer served, or whose rendered spec (its digest, an annotation) differs from what the
server's settings make now. The Kubernetes API is reached through `tunerun.cluster.k8s.KubeApi` (the same client and
errors as the k8s target's); the engine's address is its Service's name in the cluster's DNS.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
from pydantic import Field, field_validator

from tunerun.cluster.k8s import KubeRaySettings
from tunerun.cluster.run_folder import RunFolder, final_weights
from tunerun.jobs.errors import TunerunError
from tunerun.jobs.service.errors import ApiError
from tunerun.jobs.service.engines import MISSES, WATCH_S, Engine, K8sEngineSettings, ManagedEngineSettings, \
    Unavailable
from tunerun.jobs.service.full_engines import FullFineTuneEngines, FullFineTuneSettings, PooledEngine
from tunerun.jobs.spec import Strict

if TYPE_CHECKING:
    from tunerun.jobs.service.config import ServerConfig

logger = logging.getLogger("tunerun.serve.engines")
# How the server finds its own engines (`adopt`) and what each one's Deployment says of itself.
FULL_COMPONENT = "vllm-full-fine-tune"  # app.kubernetes.io/component
JOB_LABEL = "tunerun/job-id"  # whose weights it serves
BASE_ANNOTATION, SPEC_ANNOTATION = "tunerun/base", "tunerun/spec-sha256"  # its catalog model; what it was made from
STARTING_POLL_S = 2.0  # how often a starting engine's Service is asked /health
HEALTH_TIMEOUT_S = 5.0


class FullFineTunesOnKubernetes(Strict):
    """``inference.full_fine_tunes.kubernetes``: full fine-tunes' engines as Deployments the server creates.
    `tunerun serve render` writes ``namespace``, ``owner`` and ``models`` into the ConfigMap's server.yaml; the
    pod settings here, where set, replace those of the catalog model's engine (``managed.k8s``)."""

    namespace: str | None = Field(None, description="Where they run: the server's namespace (targets.k8s.namespace).")
    owner: str | None = Field(None, description="The server's Deployment, their owner: deleting it deletes them.")
    models: dict[str, ManagedEngineSettings] = Field({}, description="Catalog model → its engine's managed settings, "
                                                     "which its full fine-tunes' engines share.")
    image: str | None = Field(None, description="vLLM's image; unset: the catalog model's engine's.")
    gpus: int | None = Field(None, ge=0, le=64, description="GPUs of each; unset: the catalog model's engine's.")
    cpu: str | int | None = None
    memory: str | None = None
    base_size: str | None = Field(None, description="The emptyDir the fine-tune's weights are copied into.")
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, str | int]] | None = None

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        return None if v is None else KubeRaySettings.dns_label(v)

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str | None) -> str | None:
        return None if v is None else KubeRaySettings.dns_subdomain(v)

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        return None if v is None else KubeRaySettings._no_spaces(v)

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str | int | None) -> str | None:
        return None if v is None else K8sEngineSettings._cpu(v)

    @field_validator("memory", "base_size")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        return KubeRaySettings._quantity(v)

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else KubeRaySettings._labels(v)

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: list[dict] | None) -> list[dict] | None:
        return None if v is None else KubeRaySettings._tolerations(v)

    def engine_settings(self, base: str, full: FullFineTuneSettings) -> ManagedEngineSettings:
        """The catalog model's managed settings, with the full fine-tunes' memory settings and this block's pod."""
        settings = full.engine_settings(self.models[base])
        pod = {name: getattr(self, name) for name in ("image", "gpus", "cpu", "memory", "base_size", "node_selector",
                                                       "tolerations") if getattr(self, name) is not None}
        return settings.model_copy(update={"k8s": settings.k8s.model_copy(update=pod)})


class KubernetesFullEngine(PooledEngine, Engine):
    """One full fine-tune's engine as a Deployment and a Service: what `FullFineTuneEngines` asks of an engine
    (`begin`, `launch`, `retire`, `check_ready`, `idle_s`, `health`, ``state``, ``starts``), where launching creates
    the objects and retiring deletes them. A thread follows it: ``starting`` until the Service answers ``/health``,
    then ``ready``; ``restarting`` while a ready one stops answering (Kubernetes restarts its pod)."""

    def __init__(self, job_id: str, base: str, settings: ManagedEngineSettings, pool: KubernetesEngines):
        super().__init__(job_id, settings.max_loras, settings.max_model_len)
        self.base, self.settings, self.pool = base, settings, pool
        self.name = pool.engine_name(job_id)
        self.state = "stopped"
        self.starts, self.error, self.ready_at, self.adopted = 0, None, 0.0, False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopper: threading.Thread | None = None
        self._http = httpx.Client(timeout=HEALTH_TIMEOUT_S)

    @property
    def url(self) -> str:
        return self.pool.service_url(self.name, self.pool.namespace)

    def adapter_path(self, local_path: str | None, storage_key: str) -> str:
        # Its pod has no adapter sidecar (yet): an adapter trained on this full fine-tune would find nothing to load.
        raise ApiError(400, f"this model is an adapter trained on the full fine-tune {self.model}, whose engine on "
                            "Kubernetes loads no adapters; serve the adapter with your own vLLM", "model",
                       "model_not_served")

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "starting":
            raise Unavailable(f"the engine for {self.model} is starting (its pod copies the weights and loads them); "
                              "try again shortly", 10)
        raise Unavailable(f"the engine for {self.model} is {self.state}" + (f" ({self.error})" if self.error else ""),
                          15)

    def launch(self, after: list[threading.Thread]) -> None:
        """Create its objects once the engines stopping to make room for it (``after``) are deleted, then follow
        it until it serves."""
        self.state, self.error, self.starts = "starting", None, self.starts + 1

        def create_and_follow() -> None:
            for stopping in after:
                stopping.join()
            try:
                self.pool.create(self)
            except TunerunError as exc:  # shown in /healthz; the next request tries again
                logger.error("engine %s: its Deployment could not be created: %s", self.model, exc)
                self.error, self.state = str(exc), "stopped"
                return
            self._follow()

        self._follow_in_thread(create_and_follow)

    def adopt(self) -> None:
        """Follow objects a server made before this one started (`KubernetesEngines.adopt`)."""
        self.state, self.starts, self.adopted, self.last_used = "starting", 1, True, time.monotonic()
        self._follow_in_thread(self._follow)

    def _follow_in_thread(self, target: Callable[[], None]) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=target, name=f"engine-{self.model}", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        started, misses = time.monotonic(), 0
        while not self._stop.wait(STARTING_POLL_S if self.state == "starting" else self.pool.watch_s):
            if self._answers():
                if self.state in ("starting", "restarting"):
                    self.generation += 1  # a new pod: adapters loaded before are gone
                    self.state, self.ready_at, self.error, misses = "ready", time.monotonic(), None, 0
                    logger.info("engine %s ready after %.0f s", self.model, time.monotonic() - started)
                misses = 0
            elif self.state == "starting" and time.monotonic() - started > self.settings.start_timeout_s:
                self.error = f"its Service did not answer /health within {self.settings.start_timeout_s:.0f} s"
                logger.error("engine %s: %s; deleting it", self.model, self.error)
                self.pool.delete(self)
                self.state = "stopped"
                return
            elif self.state == "ready":
                misses += 1
                if misses >= MISSES:
                    self.state = "restarting"
                    self.error = f"did not answer /health {MISSES} times in a row (Kubernetes restarts its pod)"

    def _answers(self) -> bool:
        try:
            return self._http.get(self.url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.detach()
        self.pool.delete(self)
        self.state = "stopped"

    def detach(self) -> None:
        """Stop following it, leaving its objects (the server stops; the next one adopts them)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=HEALTH_TIMEOUT_S + 5)

    def health(self) -> dict:
        return {"kind": "full_fine_tune", "on": "kubernetes", "base": self.base, "state": self.state,
                "deployment": f"{self.pool.namespace}/{self.name}", "url": self.url, "starts": self.starts,
                "adopted": self.adopted, "error": self.error, "in_flight": self.in_flight,
                "idle_s": round(self.idle_s()), "idle_stop_s": self.pool.settings.idle_stop_s}


def cluster_address(name: str, namespace: str) -> str:
    """A Service's address in the cluster's DNS, from any namespace."""
    from tunerun.jobs.service.deploy import ENGINE_PORT

    return f"http://{name}.{namespace}.svc:{ENGINE_PORT}"


class KubernetesEngines(FullFineTuneEngines):
    """The full fine-tunes' engines of a server on Kubernetes: `FullFineTuneEngines`' rules, engines of objects.
    ``api`` makes the Kubernetes API client (`tunerun.cluster.k8s.KubeApi`: its ``create_served``,
    ``list_served``, ``get_served`` and ``delete_served``), called when first needed; ``service_url`` gives an
    engine's address from its Service's name and namespace (default: the cluster's DNS, `cluster_address`)."""

    def __init__(self, settings: FullFineTuneSettings, config: ServerConfig, api: Callable[[], object] | None = None,
                 service_url: Callable[[str, str], str] | None = None, watch_s: float = WATCH_S):
        super().__init__(settings)
        self.kubernetes: FullFineTunesOnKubernetes = settings.kubernetes
        self.config, self.service_url, self.watch_s = config, service_url or cluster_address, watch_s
        self.namespace = self.kubernetes.namespace or config.targets.k8s.namespace
        self._make_api, self._api, self._owner = api or _kube_api, None, None
        self._api_lock = threading.Lock()

    def serves(self, base: str) -> bool:
        """Whether full fine-tunes of ``base`` get an engine here (its engine's settings are known)."""
        return base in self.kubernetes.models

    def engine(self, job_id: str, base: str, base_settings: ManagedEngineSettings | None = None,
               weights: Callable[[], str] | None = None, log_dir=None) -> KubernetesFullEngine:
        """The job's engine, running or not (its first request creates it). The weights are read by its pod, with
        the settings of ``base``'s engine as `tunerun serve render` wrote them: the other arguments of
        `FullFineTuneEngines.engine` are a host's."""
        with self._lock:
            if job_id not in self._engines:
                self._engines[job_id] = KubernetesFullEngine(
                    job_id, base, self.kubernetes.engine_settings(base, self.settings), self)
            return self._engines[job_id]

    @staticmethod
    def engine_name(job_id: str) -> str:
        from tunerun.jobs.service.deploy import full_engine_name

        return full_engine_name(job_id)

    # ── the objects ─────────────────────────────────────────────────────────────────────────────────────────

    def manifests(self, job_id: str, base: str, settings: ManagedEngineSettings, owner: dict | None) -> list[dict]:
        from tunerun.jobs.service.deploy import full_engine_manifests

        weights = RunFolder(self.config.storage, job_id).uri(final_weights("model"))
        return full_engine_manifests(self.config, job_id, base, settings, weights, owner)

    def create(self, engine: KubernetesFullEngine) -> None:
        """Its Deployment and Service; one there already (made by a server beside this one) is taken as is."""
        api = self.api()
        for document in self.manifests(engine.model, engine.base, engine.settings, self.owner()):
            if api.create_served(document) is None:
                logger.info("engine %s: %s %s was there already", engine.model, document["kind"], engine.name)

    def delete(self, engine: KubernetesFullEngine) -> None:
        try:
            for kind in ("Deployment", "Service"):
                self.api().delete_served(kind, self.namespace, engine.name)
        except TunerunError as exc:  # left running: the next server's adoption deletes it
            logger.error("engine %s: its objects could not be deleted: %s", engine.model, exc)
            engine.error = str(exc)

    def api(self):
        with self._api_lock:
            if self._api is None:
                self._api = self._make_api()
            return self._api

    def owner(self) -> dict | None:
        """The server's Deployment as an owner reference (read once); None when it is not named or not found."""
        if self._owner is None and self.kubernetes.owner:
            found = self.api().get_served("Deployment", self.namespace, self.kubernetes.owner)
            if found is None:
                logger.warning("Deployment %s/%s not found: full fine-tunes' engines get no owner", self.namespace,
                               self.kubernetes.owner)
                return None
            self._owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": self.kubernetes.owner,
                           "uid": found["metadata"]["uid"]}
        return self._owner

    # ── a server that starts again ──────────────────────────────────────────────────────────────────────────

    def start(self) -> None:
        threading.Thread(target=self.adopt, name="full-engines-adopt", daemon=True).start()
        super().start()

    def adopt(self) -> list[str]:
        """Follow the engines an earlier server made that this one would make, up to ``max_engines``, newest
        first; delete the others and any Service without its Deployment. The job ids adopted."""
        selector = f"app.kubernetes.io/component={FULL_COMPONENT}"
        try:
            deployments = self.api().list_served("Deployment", self.namespace, selector)
            services = self.api().list_served("Service", self.namespace, selector)
        except TunerunError as exc:
            logger.error("full fine-tunes' engines made before this server started were not looked for: %s", exc)
            return []
        adopted, kept = [], set()
        for deployment in sorted(deployments, key=lambda d: d["metadata"].get("creationTimestamp") or "",
                                 reverse=True):
            job_id, reason = self._adoptable(deployment, len(adopted))
            name = deployment["metadata"]["name"]
            with self._lock:
                if job_id is not None and job_id in self._engines:  # a request made it meanwhile
                    kept.add(name)
                    continue
                if reason is None:
                    engine = KubernetesFullEngine(job_id, deployment["metadata"]["annotations"][BASE_ANNOTATION],
                                                  self._settings_of(deployment), self)
                    self._engines[job_id] = engine
                    engine.adopt()
                    adopted.append(job_id)
                    kept.add(name)
                    continue
            logger.info("engine %s from an earlier server: deleted (%s)", name, reason)
            self._delete_named(name)
        for service in services:
            if service["metadata"]["name"] not in kept | {d["metadata"]["name"] for d in deployments}:
                self._delete_named(service["metadata"]["name"])
        if adopted:
            logger.info("adopted the engines of %s, made before this server started", ", ".join(adopted))
        return adopted

    def _adoptable(self, deployment: dict, adopted: int) -> tuple[str | None, str | None]:
        """The job whose engine ``deployment`` is, and why it is not adopted (None: it is)."""
        from tunerun.jobs.service.deploy import spec_digest

        metadata = deployment["metadata"]
        job_id = (metadata.get("labels") or {}).get(JOB_LABEL)
        base = (metadata.get("annotations") or {}).get(BASE_ANNOTATION)
        if job_id is None or base is None or not self.serves(base):
            return job_id, f"its catalog model {base} has no engine settings here"
        if adopted >= self.settings.max_engines:
            return job_id, f"more than max_engines ({self.settings.max_engines})"
        settings = self._settings_of(deployment)
        if metadata["annotations"].get(SPEC_ANNOTATION) != spec_digest(self.manifests(job_id, base, settings, None)):
            return job_id, "this server's settings for it differ from those it was made with"
        return job_id, None

    def _settings_of(self, deployment: dict) -> ManagedEngineSettings:
        return self.kubernetes.engine_settings(deployment["metadata"]["annotations"][BASE_ANNOTATION], self.settings)

    def _delete_named(self, name: str) -> None:
        try:
            for kind in ("Deployment", "Service"):
                self.api().delete_served(kind, self.namespace, name)
        except TunerunError as exc:
            logger.error("%s could not be deleted: %s", name, exc)

    def close(self) -> None:
        """Stop following the engines and leave them running: the server that starts next adopts them (deleting
        the server's Deployment deletes them, their owner)."""
        self._closed.set()
        with self._lock:
            engines = list(self._engines.values())
        for engine in engines:
            engine.detach()
        if self._watcher is not None:
            self._watcher.join(timeout=5)


def _kube_api():
    from tunerun.cluster.k8s import KubeApi

    return KubeApi()


def full_fine_tune_engines(config: ServerConfig) -> FullFineTuneEngines:
    """The server's pool of full fine-tunes' engines: processes on this host, or Kubernetes objects where
    ``inference.full_fine_tunes.kubernetes`` is set (`tunerun serve render` sets it)."""
    settings = config.inference.full_fine_tunes
    if settings is not None and getattr(settings, "kubernetes", None) is not None:
        return KubernetesEngines(settings, config)
    return FullFineTuneEngines(settings)

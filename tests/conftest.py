"""Fixtures shared by every test folder."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (a script folder, not a package) as a module."""
    module_name = f"tunerun_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def _mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real small disk: a tmpfs of ``size`` mounted at ``where`` (made here) for the duration; skips where this
    machine cannot mount one (it needs root, as CI runs)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # a straggler still holds a file


@pytest.fixture(scope="session")
def tmpfs():
    """``with tmpfs(path, "1m") as disk:`` a real small disk for the duration (skips unless root, as CI runs)."""
    return _mounted_tmpfs


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama and its SentencePiece tokenizer, built offline once per session by
    examples/make_tiny_model.py; load it with the same from_pretrained calls a real model takes."""
    return load_example("make_tiny_model").make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, loaded as the trainer loads it (AutoTokenizer.from_pretrained)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def free_loopback_port() -> int:
    """A TCP port nobody listens on right now (bound and released on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port()`` → a TCP port free on loopback, for the servers a test starts."""
    return free_loopback_port


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``tunerun ARGS…`` as a user runs it: a new process, output captured, unbuffered."""
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tunerun():
    """``tunerun("validate", "job.yaml", cwd=…, env=None, timeout=300)`` → the finished CompletedProcess."""
    return run_cli


@pytest.fixture
def stub_model_dir(tmp_path: Path) -> Path:
    """A model folder with only an empty config.json: enough for validate/plan/render, which load no weights."""
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    return model


@pytest.fixture(scope="session")
def example_module():
    """``example_module("make_support_data")`` imports that script from examples/."""
    return load_example


# Tests that train, serve or benchmark through Ray, Slurm and vLLM want most of a small machine each and share
# module- and session-scoped runs (a session fixture is made once per worker): each group below runs in order on
# one pytest-xdist worker, beside the other group, and the unit tests go to whichever worker is free (scripts/test
# runs --dist loadgroup). Sizes from a run one test after another (37e58bf, 2 cores): end-to-end 1,993 s; the other
# group 1,382 s, and the unit tests' 537 s come after it, so both cores stay busy to the end. The first path prefix
# that matches names a test's group.
GROUPS = {
    "tests/bench/": "benchmarks, learning, S3",
    "tests/e2e/test_learning.py": "benchmarks, learning, S3",  # with test_qlora_zero3: one sharded run for both
    "tests/e2e/test_qlora_zero3.py": "benchmarks, learning, S3",
    "tests/e2e/test_preference.py": "benchmarks, learning, S3",
    "tests/e2e/test_s3_runs.py": "benchmarks, learning, S3",
    "tests/e2e/": "end-to-end",
}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's, called only where it runs the tests
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup by path (GROUPS): xdist's own groups are xdist_group marks, which it adds to each test's id,
    and pytest 9 ids no longer take the addition."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class PathGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return next((group for prefix, group in GROUPS.items() if nodeid.startswith(prefix)), nodeid)

    return PathGroups(config, log)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is present (a lent GPU machine) and skip, saying why, everywhere else."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class S3Server:
    """A real S3 protocol server (moto) on loopback, reached over HTTP by boto3 and pyarrow like MinIO."""

    def __init__(self, process: subprocess.Popen, endpoint: str):
        self.process, self.endpoint = process, endpoint

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def freeze(self) -> None:
        """An outage: the server stops answering (connections hang) but keeps every object."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


def _start_moto(log_dir: Path, **env: str) -> S3Server:
    port = free_loopback_port()
    log = (log_dir / "moto.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:  # any HTTP answer means it is up
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.2)
    return S3Server(process, endpoint)


def _stop_moto(server: S3Server) -> None:
    os.kill(server.process.pid, signal.SIGCONT)
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free loopback port, with test credentials in the environment."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = _start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    _stop_moto(server)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server_checking_credentials(tmp_path_factory):
    """A second moto server that authenticates every request, as MinIO does: unknown keys are refused."""
    server = _start_moto(tmp_path_factory.mktemp("moto-auth"), INITIAL_NO_AUTH_ACTION_COUNT="0")
    yield server
    _stop_moto(server)


class MlflowServer:
    """A real `mlflow server` on loopback: SQLite backend store, local artifact root served through the server
    (mlflow-artifacts:), as a team's self-hosted one. ``stop``/``start`` keep its database: an outage."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_loopback_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.root / "mlflow.log").open("ab")
        mlflow = Path(sys.executable).with_name("mlflow")
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # its own group: uvicorn's child too
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.3)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)

    def freeze(self) -> None:
        """An outage the client only sees as requests that time out (the server keeps everything)."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` (installed by the test extra) on a free loopback port, for the whole session."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.thaw()
    server.stop()

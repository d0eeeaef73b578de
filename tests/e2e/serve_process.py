"""`tunerun serve` as a process for the end-to-end tests: a catalog template, the server, stopping its drivers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from processes import session_pids

TEMPLATE = """# a job spec the platform team wrote: the model, method and budget users fine-tune with
name: support
model: {{path: {model}, dtype: float32}}
method: {{kind: lora, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
data: {{eval_fraction: 0.05, max_seq_len: 192}}
training: {{epochs: 1, max_steps: {steps}, micro_batch_size: 4, global_batch_size: 8, learning_rate: 3.0e-3,
           gradient_checkpointing: false}}
eval: {{every_steps: 4, max_examples: 8, max_new_tokens: 12, general: null}}
checkpoint: {{every_steps: 4, keep_last: 3}}
resources: {{workers_per_node: 2}}
"""
WAIT_S = 600


class Server:
    def __init__(self, root: Path, port: int, env: dict):
        self.root, self.port, self.env, self.process = root, port, env, None

    def start(self) -> None:
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "tunerun.jobs.cli", "serve", "--config", "server.yaml",
                                         "--port", str(self.port)], cwd=self.root, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/docs", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
                time.sleep(0.3)
        pytest.fail("the server did not start")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


def stop_drivers(runs: Path) -> None:
    """Drivers are detached from the server: stop any still training."""
    for info in runs.glob("ftjob-*/run.json"):
        pid = json.loads(info.read_text()).get("local", {}).get("pid")
        if pid and session_pids(pid):
            os.killpg(pid, signal.SIGKILL)


def serve_models(root: Path, tiny_model: Path, steps: dict[str, int], port: int, tunerun) -> tuple[Server, dict]:
    """A catalog of the tiny model's LoRA template (a name → its step count), keys for projects acme and globex,
    and the server started on ``port``: (the server, {project: key})."""
    for name, n in steps.items():
        (root / f"{name}.yaml").write_text(TEMPLATE.format(model=tiny_model, steps=n))
    catalog = "".join(f"  {name}: {{job: {name}.yaml}}\n" for name in steps)
    (root / "server.yaml").write_text(f"storage: {{uri: ./runs}}\nmax_concurrent_runs: 1\nmodels:\n{catalog}")
    return start_with_keys(root, port, tunerun)


def start_with_keys(root: Path, port: int, tunerun) -> tuple[Server, dict]:
    """Keys for projects acme and globex, and the server of ``root``/server.yaml started on ``port``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNERUN_CACHE": str(root / "cache")}
    keys = {}
    for project in ("acme", "globex"):
        made = tunerun("serve", "keys", "create", project, "--config", "server.yaml", cwd=root, env=env, timeout=60)
        assert made.returncode == 0, made.stderr
        keys[project] = made.stdout.strip()
    server = Server(root, port, env)
    server.start()
    return server, keys


STUB_TEMPLATE = """name: support
model: {path: MODEL}
method: {kind: lora}
data: {eval_fraction: 0.1, max_seq_len: 128}
"""


def stub_catalog(root: Path, storage: str = "./runs", extra: str = "") -> None:
    """server.yaml with one catalog model whose folder holds only config.json: for servers that train nothing
    (the model is never loaded)."""
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "support.yaml").write_text(STUB_TEMPLATE.replace("MODEL", str(root / "model")))
    (root / "server.yaml").write_text(f"storage: {{uri: {storage}}}\nmodels:\n  support-tiny: {{job: support.yaml}}\n"
                                      + extra)

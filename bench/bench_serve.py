"""`tunerun serve` under load: request latency with many jobs in the ledger, and what polling costs a training job.

    python bench/bench_serve.py [--jobs 1000] [--requests 200] [--clients 50] [--seconds 60] [--skip-training]

1. Latency. A ledger of ``--jobs`` finished jobs (run folders as the service writes them: service.json, run.json,
   events, metrics) is served by a real ``tunerun serve`` on loopback. p50/p99 of ``jobs.list`` (a page of 20)
   and ``jobs.retrieve`` through the official `openai` client, against the baseline of reading the same run
   folders directly in this process (the listing plus the files one job object is made of). Ratio printed.
2. Load. One real job trains (the tiny model, 2 CPU workers) while ``--clients`` threads each poll
   ``retrieve`` and ``list_events`` once a second for ``--seconds``; every failed request is counted. The same
   job then runs unpolled; the ratio of their median step times says what the polling cost the training.
Nothing here asserts: it prints what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = """name: support
model: {{path: {model}, dtype: float32}}
method: {{kind: lora, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
data: {{eval_fraction: 0.05, max_seq_len: 192}}
training: {{epochs: 1, max_steps: {steps}, micro_batch_size: 4, global_batch_size: 8, learning_rate: 3.0e-3,
           gradient_checkpointing: false}}
eval: {{every_steps: 1000, metrics: [loss], general: null}}
checkpoint: {{every_steps: 1000}}
resources: {{workers_per_node: 2}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_ledger(runs: Path, count: int) -> list[str]:
    """``count`` finished jobs of project ``bench``, each with the files a real one has (8 steps of metrics)."""
    ids = []
    now = time.time()
    for n in range(count):
        job_id = f"ftjob-{n:024x}"
        folder = runs / job_id
        folder.mkdir(parents=True)
        (folder / "service.json").write_text(json.dumps({
            "job_id": job_id, "project": "bench", "model": "support-tiny", "created_at": now - count + n,
            "request": {"model": "support-tiny", "training_file": "file-" + "0" * 24, "seed": 42},
            "result_file": f"file-{n:024x}", "hyperparameters": {"n_epochs": 1, "batch_size": 8,
                                                                 "learning_rate_multiplier": 1.0},
            "seed": 42}))
        (folder / "run.json").write_text(json.dumps({"run_id": job_id, "state": "succeeded", "target": "local",
                                                     "method": "lora", "created_at": now, "finished_at": now}))
        (folder / "job.yaml").write_text("spec: {training: {seed: 42}}\n")
        (folder / "events.jsonl").write_text("".join(json.dumps({"time": now, "event": e}) + "\n" for e in (
            "run_created", "run_started", "data_prepared", "training_started", "run_succeeded")))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({
            "time": now, "step": s, "loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 900.0, "tokens_seen": 1000 * s,
            "total_steps": 8, "elapsed_s": float(s)}) + "\n" for s in range(1, 9)))
        ids.append(job_id)
    return ids


class Server:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        log = (root / "server.log").open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "tunerun.jobs.cli", "serve", "--config", "server.yaml",
                                         "--port", str(self.port)], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit(f"the server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)

    def client(self, key: str):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def timed(call, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def direct_read(runs: Path, job_id: str | None) -> None:
    """The baseline: the listing of the run folders, then the files a job object is made of."""
    if job_id is None:
        names = sorted((p.name for p in runs.iterdir() if (p / "run.json").exists()), reverse=True)[:20]
    else:
        names = [job_id]
    for name in names:
        for file in ("service.json", "run.json", "events.jsonl", "metrics.jsonl"):
            (runs / name / file).read_bytes()


def latency(root: Path, server: Server, key: str, ids: list[str], repeats: int) -> None:
    api = server.client(key)
    runs = root / "runs"
    api.fine_tuning.jobs.list(limit=20)  # warm the server's record cache, as a running server has it
    rows = [("jobs.list (20 of %d)" % len(ids), lambda: api.fine_tuning.jobs.list(limit=20),
             lambda: direct_read(runs, None)),
            ("jobs.retrieve", lambda: api.fine_tuning.jobs.retrieve(ids[len(ids) // 2]),
             lambda: direct_read(runs, ids[len(ids) // 2]))]
    print(f"latency, {len(ids)} jobs in the ledger, {repeats} requests each (ms)")
    for name, served, direct in rows:
        s50, s99 = percentiles(timed(served, repeats))
        d50, d99 = percentiles(timed(direct, repeats))
        print(f"  {name:24s} served p50 {s50:7.2f} p99 {s99:7.2f} · direct read p50 {d50:6.3f} p99 {d99:6.3f} · "
              f"ratio p50 {s50 / d50:,.0f}×")


def step_times(metrics: Path) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    elapsed = [r["elapsed_s"] for r in rows]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]


def train_once(server: Server, key: str, file_id: str, root: Path, clients: int, seconds: float) -> tuple:
    """Train for ``seconds`` once the job runs, with ``clients`` pollers, then cancel it: its step times."""
    api = server.client(key)
    job = api.fine_tuning.jobs.create(model="support-bench", training_file=file_id)
    failures, requests, stop = [], [0], threading.Event()

    def poll():
        mine = server.client(key)
        while not stop.is_set():
            for call in (lambda: mine.fine_tuning.jobs.retrieve(job.id),
                         lambda: mine.fine_tuning.jobs.list_events(job.id, limit=20)):
                try:
                    call()
                    requests[0] += 1
                except Exception as exc:  # noqa: BLE001 - counted and reported, whatever it is
                    failures.append(repr(exc))
            stop.wait(1.0)

    while (api.fine_tuning.jobs.retrieve(job.id).tunerun or {}).get("step") is None:
        time.sleep(0.5)
    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(clients)]
    for thread in pollers:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in pollers:
        thread.join(timeout=30)
    api.fine_tuning.jobs.cancel(job.id)
    return step_times(root / "runs" / job.id / "metrics.jsonl"), requests[0], failures


def load(root: Path, server: Server, key: str, clients: int, seconds: float) -> None:
    api = server.client(key)
    upload = api.files.create(file=(REPO / "examples/data/support_tickets.jsonl").open("rb"), purpose="fine-tune")
    while api.files.retrieve(upload.id).status == "uploaded":
        time.sleep(0.5)
    polled, requests, failures = train_once(server, key, upload.id, root, clients, seconds)
    quiet, _, _ = train_once(server, key, upload.id, root, 0, seconds)
    p, q = statistics.median(polled), statistics.median(quiet)
    print(f"load, {clients} clients polling retrieve + list_events every second for {seconds:.0f} s while a job "
          "trains")
    print(f"  requests {requests:,} · failed {len(failures)}" + (f" (first: {failures[0]})" if failures else ""))
    print(f"  median step polled {p * 1000:.0f} ms ({len(polled)} steps) · unpolled {q * 1000:.0f} ms "
          f"({len(quiet)} steps) · ratio {p / q:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--skip-training", action="store_true", help="measure latency only")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tunerun-bench-serve-"))
    try:
        subprocess.run([sys.executable, str(REPO / "examples" / "make_tiny_model.py"), str(root / "model")],
                       check=True, capture_output=True)
        # Long enough to outlast --seconds: each run is cancelled once it has been measured.
        (root / "support.yaml").write_text(TEMPLATE.format(model=root / "model", steps=100_000))
        (root / "server.yaml").write_text("storage: {uri: ./runs}\nmodels:\n  support-tiny: {job: support.yaml}\n"
                                          "  support-bench: {job: support.yaml}\n")
        ids = write_ledger(root / "runs", args.jobs)
        key = subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", "serve", "keys", "create", "bench",
                              "--config", "server.yaml"], cwd=root, check=True, capture_output=True,
                             text=True).stdout.strip()
        server = Server(root)
        try:
            latency(root, server, key, ids, args.requests)
            if not args.skip_training:
                load(root, server, key, args.clients, args.seconds)
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

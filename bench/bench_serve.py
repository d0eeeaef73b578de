"""`tunerun serve` under load: request latency with many jobs in the ledger, and what polling costs a training job.

    python bench/bench_serve.py [--jobs 1000] [--requests 200] [--dashboards 10] [--poll-seconds 20]
                                [--clients 50] [--seconds 60] [--skip-s3] [--skip-training] [--quick]

1. Latency. A ledger of ``--jobs`` finished jobs (run folders as the service writes them: service.json, run.json,
   events, metrics) is served by a real ``tunerun serve`` on loopback, from a local folder and then from an S3
   server (moto on loopback, as in the tests). p50/p99 of ``jobs.list`` (a page of 20), ``jobs.retrieve`` and the
   dashboard's poll (the page of 50 newest jobs that static/jobs.js asks for every 2 s) through the official
   `openai` client, against the baseline of reading the same run folders directly in this process (the listing
   plus the files the job objects are made of; on S3 with one boto3 client). Ratio printed.
2. Dashboards. ``--dashboards`` threads each poll as the jobs page does (every 2 s) for ``--poll-seconds``; p50/p99
   of their polls under that load, against the same direct read.
3. Load. One real job trains (the tiny model, 2 CPU workers) while ``--clients`` threads each poll
   ``retrieve`` and ``list_events`` once a second for ``--seconds``; every failed request is counted. The same
   job then runs unpolled; the ratio of their median step times says what the polling cost the training.
Nothing here asserts: it prints what it measured. ``--quick`` (CI's smoke test, tests/bench/test_benchmarks_run.py):
parts 1 and 2 on 50 jobs of a local folder, 10 requests, 2 dashboards for 2 s — proof that they run, not a measurement.
It skips the S3 case and part 3, two cold starts of a training job (minutes on a busy 2-core machine).
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


FILES = ("service.json", "run.json", "events.jsonl", "metrics.jsonl")  # what a job object is made of
DASHBOARD_PAGE = 50  # static/jobs.js: the newest jobs it shows and polls
POLL_S = 2.0  # static/jobs.js REFRESH_MS


class LocalFolders:
    """The baseline on a local folder: the listing of the run folders, then the files the job objects are made of."""

    def __init__(self, runs: Path):
        self.runs = runs

    def read(self, job_id: str | None, count: int = 20) -> None:
        if job_id is None:
            names = sorted((p.name for p in self.runs.iterdir() if (p / "run.json").exists()), reverse=True)[:count]
        else:
            names = [job_id]
        for name in names:
            for file in FILES:
                (self.runs / name / file).read_bytes()


class S3Folders:
    """The same baseline on S3, with one boto3 client: a listing of the prefix, then one GET per file."""

    def __init__(self, endpoint: str, bucket: str, prefix: str):
        import boto3

        self.s3, self.bucket, self.prefix = boto3.client("s3", endpoint_url=endpoint), bucket, prefix

    def read(self, job_id: str | None, count: int = 20) -> None:
        if job_id is None:
            names = []
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/",
                                                                          Delimiter="/"):
                names += [p["Prefix"][len(self.prefix) + 1:].rstrip("/") for p in page.get("CommonPrefixes", [])]
            names = sorted(names, reverse=True)[:count]
        else:
            names = [job_id]
        for name in names:
            for file in FILES:
                self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}/{file}")["Body"].read()


def latency(where: str, server: Server, key: str, ids: list[str], repeats: int, direct) -> None:
    api = server.client(key)
    started = time.perf_counter()
    api.with_options(timeout=900).fine_tuning.jobs.list(limit=20)  # a server just started reads every record once
    print(f"first page after the server started ({where}): {time.perf_counter() - started:.2f} s")
    middle = ids[len(ids) // 2]
    rows = [("jobs.list (20 of %d)" % len(ids), lambda: api.fine_tuning.jobs.list(limit=20),
             lambda: direct.read(None)),
            ("jobs.retrieve", lambda: api.fine_tuning.jobs.retrieve(middle), lambda: direct.read(middle)),
            (f"dashboard poll ({DASHBOARD_PAGE})", lambda: api.fine_tuning.jobs.list(limit=DASHBOARD_PAGE),
             lambda: direct.read(None, DASHBOARD_PAGE))]
    print(f"latency, {where}, {len(ids)} jobs in the ledger, {repeats} requests each (ms)")
    for name, served, baseline in rows:
        served()
        s50, s99 = percentiles(timed(served, repeats))
        d50, d99 = percentiles(timed(baseline, repeats))
        print(f"  {name:24s} served p50 {s50:7.2f} p99 {s99:7.2f} · direct read p50 {d50:6.3f} p99 {d99:6.3f} · "
              f"ratio p50 {s50 / d50:,.1f}×")


def dashboards(where: str, server: Server, key: str, count: int, seconds: float, direct) -> None:
    """``count`` jobs pages open at once, each polling the newest jobs every 2 s as static/jobs.js does."""
    samples, failures, stop = [], [], threading.Event()

    def page():
        api = server.client(key)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                api.fine_tuning.jobs.list(limit=DASHBOARD_PAGE)
                samples.append((time.perf_counter() - started) * 1000)
            except Exception as exc:  # noqa: BLE001 - counted and reported, whatever it is
                failures.append(repr(exc))
            stop.wait(POLL_S)

    run_side_by_side(page, count, seconds, stop, join_s=60)
    s50, s99 = percentiles(samples)
    d50, _ = percentiles(timed(lambda: direct.read(None, DASHBOARD_PAGE), 50))
    print(f"dashboards, {where}: {count} jobs pages polling every {POLL_S:.0f} s for {seconds:.0f} s: {len(samples)} "
          f"polls, {len(failures)} failed · p50 {s50:.2f} ms p99 {s99:.2f} ms · direct read p50 {d50:.3f} ms · "
          f"ratio p50 {s50 / d50:,.1f}×")


def run_side_by_side(work, count: int, seconds: float, stop: threading.Event, join_s: float) -> None:
    """``count`` threads running ``work`` for ``seconds``; then ``stop`` is set and they are waited for."""
    threads = [threading.Thread(target=work, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=join_s)


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
    run_side_by_side(poll, clients, seconds, stop, join_s=30)
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


def moto_server(root: Path):
    """moto's S3 server on loopback (`pip install "moto[server]"`), with test credentials for every process."""
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=(root / "moto.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            return process, endpoint
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"moto_server did not start: {(root / 'moto.log').read_text()[-2000:]}")
            time.sleep(0.3)


def upload(local: Path, endpoint: str, bucket: str, prefix: str) -> None:
    import boto3
    from concurrent.futures import ThreadPoolExecutor

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    files = [p for p in local.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local)}"), files))


def serve_s3(root: Path, ids: list[str], args) -> None:
    """The same ledger and key on an S3 server, served by a second `tunerun serve`."""
    moto, endpoint = moto_server(root)
    try:
        s3_root = root / "s3"
        s3_root.mkdir()
        shutil.copy(root / "support.yaml", s3_root / "support.yaml")
        (s3_root / "server.yaml").write_text(f"storage: {{uri: 's3://bench/runs', endpoint_url: '{endpoint}'}}\n"
                                             "models:\n  support-tiny: {job: support.yaml}\n")
        upload(root / "runs", endpoint, "bench", "runs")
        key = make_key(s3_root)
        server = Server(s3_root)
        try:
            direct = S3Folders(endpoint, "bench", "runs")
            latency("S3 (moto on loopback)", server, key, ids, args.requests, direct)
            dashboards("S3", server, key, args.dashboards, args.poll_seconds, direct)
        finally:
            server.stop()
    finally:
        os.killpg(moto.pid, signal.SIGTERM)
        moto.wait(timeout=30)


def make_key(root: Path) -> str:
    return subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", "serve", "keys", "create", "bench", "--config",
                           "server.yaml"], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--dashboards", type=int, default=10)
    parser.add_argument("--poll-seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--skip-s3", action="store_true", help="no S3 case")
    parser.add_argument("--skip-training", action="store_true", help="measure latency only")
    parser.add_argument("--quick", action="store_true", help="small counts, short waits: that it runs, not a figure")
    args = parser.parse_args()
    if args.quick:  # the flags given still win over the quick sizes
        parser.set_defaults(jobs=50, requests=10, dashboards=2, poll_seconds=2.0, skip_training=True, skip_s3=True)
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
        if not args.skip_s3:  # the ledger alone, before the local server adds its key and uploads
            serve_s3(root, ids, args)
        key = make_key(root)
        server = Server(root)
        try:
            direct = LocalFolders(root / "runs")
            latency("local folder", server, key, ids, args.requests, direct)
            dashboards("local folder", server, key, args.dashboards, args.poll_seconds, direct)
            if not args.skip_training:
                load(root, server, key, args.clients, args.seconds)
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

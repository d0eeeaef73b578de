"""Inference through `tunerun serve` against the same requests sent straight to its vLLM engine.

    python bench/bench_inference.py [--requests 32] [--max-tokens 64] [--concurrency 1 8] [--quick]

A tiny Llama (examples/make_tiny_model.py) is the catalog model; `tunerun serve` starts its managed engine from
.venv-vllm (scripts/setup-vllm makes it). For each concurrency, the same streamed completions (greedy,
``ignore_eos`` so every request generates ``--max-tokens``) go to the gateway (a project's key, the model resolved
and the stream passed on) and then to the engine's own port: generated tokens per second over the batch and the
median time to the first token, and their ratios (target: the gateway at ≥ 0.95 of direct). Batches alternate
between the two paths for ``--rounds`` rounds and the medians are shown: on a small machine the engine, the gateway
and this client share the CPU, and its load drifts. Nothing here asserts: it prints what it measured. ``--quick``
(CI's smoke test, tests/bench/test_benchmarks_run.py): one round of 4 requests of 8 tokens at concurrency 1 and 2 —
proof that both paths serve, not a measurement (the engine's start dominates it).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = """name: bench
model: {{path: {model}, dtype: float32}}
method: {{kind: lora}}
data: {{train: unused.jsonl}}
"""
PROMPT = "<|system|>\nClassify the support ticket.\n<|user|>\nWhere is my refund for order #4411?\n<|assistant|>\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(root: Path, vllm_python: Path) -> tuple[subprocess.Popen, int, str]:
    model = root / "tiny-llama"
    subprocess.run([sys.executable, str(REPO / "examples" / "make_tiny_model.py"), str(model)], check=True,
                   capture_output=True)
    (root / "bench.yaml").write_text(TEMPLATE.format(model=model))
    engine = free_port()
    (root / "server.yaml").write_text(
        "storage: {uri: ./runs}\nmodels:\n  tiny: {job: bench.yaml}\ninference:\n  engines:\n    tiny: {managed: "
        f"{{python: {vllm_python}, port_min: {engine}, port_max: {engine + 40}, max_model_len: 512, "
        "kv_cache_gib: 1}}\n")
    env = {**os.environ, "TUNERUN_CACHE": str(root / "cache")}
    cli = [sys.executable, "-m", "tunerun.jobs.cli", "serve"]
    key = subprocess.run([*cli, "keys", "create", "bench", "--config", "server.yaml"], cwd=root, env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    port = free_port()
    server = subprocess.Popen([*cli, "--config", "server.yaml", "--port", str(port)], cwd=root, env=env,
                              stdout=(root / "server.log").open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    return server, port, key


def engine_url(port: int, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                engine = json.loads(answer.read())["engines"]["tiny"]
            if engine["state"] == "ready":
                return engine["url"]
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("the engine did not become ready")


def one_request(client: httpx.Client, url: str, headers: dict, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first generated text, completion tokens) of one streamed completion."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with client.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=300) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, tokens


def measure(url: str, headers: dict, requests: int, concurrency: int, max_tokens: int) -> tuple[float, float]:
    """(generated tokens per second over the batch, median time to first token)."""
    with httpx.Client(limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        one_request(client, url, headers, 4)  # warm the path (and the engine's graphs)
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda _: one_request(client, url, headers, max_tokens), range(requests)))
        wall = time.perf_counter() - start
    return sum(tokens for _, tokens in results) / wall, statistics.median(first for first, _ in results)


def medians(results: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3, help="alternating gateway/direct batches; medians shown")
    parser.add_argument("--quick", action="store_true", help="a few short requests: that it runs, not a figure")
    args = parser.parse_args()
    if args.quick:  # the flags given still win over the quick sizes
        parser.set_defaults(requests=4, max_tokens=8, concurrency=[1, 2], rounds=1)
        args = parser.parse_args()
    made = subprocess.run([str(REPO / "scripts" / "setup-vllm")], cwd=REPO, capture_output=True, text=True)
    if made.returncode:
        raise SystemExit(made.stderr[-2000:])
    vllm_python = REPO / made.stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        server, port, key = start_server(Path(tmp), vllm_python)
        try:
            engine = engine_url(port)
            gateway = f"http://127.0.0.1:{port}"
            print(f"{'concurrency':>11} {'gateway tok/s':>14} {'direct tok/s':>13} {'ratio':>6} "
                  f"{'gateway TTFT':>13} {'direct TTFT':>12} {'ratio':>6}")
            ratios = []
            for concurrency in args.concurrency:
                direct, through = [], []
                for _ in range(args.rounds):  # alternating: on a shared CPU, load drifts between batches
                    through.append(measure(gateway, {"Authorization": f"Bearer {key}"}, args.requests, concurrency,
                                           args.max_tokens))
                    direct.append(measure(engine, {}, args.requests, concurrency, args.max_tokens))
                direct, through = medians(direct), medians(through)
                print(f"{concurrency:>11} {through[0]:>14.1f} {direct[0]:>13.1f} {through[0] / direct[0]:>6.2f} "
                      f"{through[1] * 1000:>11.1f}ms {direct[1] * 1000:>10.1f}ms "
                      f"{direct[1] / through[1] if through[1] else 0:>6.2f}")
                ratios.append(f"{through[0] / direct[0]:.2f} at concurrency {concurrency}")
            print(f"ratio gateway/direct tokens per second (target ≥ 0.95): {', '.join(ratios)}")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()

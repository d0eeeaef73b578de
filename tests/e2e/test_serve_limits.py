"""`tunerun serve` against hostile bodies and a full disk, as a process on loopback (nothing trains here).

The server's memory is read from /proc while bodies of hundreds of MB arrive without a key or over a limit; its
temporary directory and its storage are small tmpfs mounts (root only, as CI runs; elsewhere the module skips),
so a chunked upload that were spooled whole, or a write to a full storage, would show.
"""
from __future__ import annotations

import os
import select
import socket
import time
from pathlib import Path

import openai
import pytest
from serve_process import Server, stub_catalog
from test_disk_full import fill

REPO = Path(__file__).resolve().parents[2]
TICKETS = REPO / "examples" / "data" / "support_tickets.jsonl"
MIB = 1 << 20
UPLOAD_LIMIT = 2_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port, tunerun, tmpfs):
    root = tmp_path_factory.mktemp("serve-limits")
    stub_catalog(root, "./storage/runs", f"uploads: {{max_file_bytes: {UPLOAD_LIMIT}}}\n")
    with tmpfs(root / "storage", "24m"), tmpfs(root / "tmp", "8m"):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(root / "tmp")}
        keys = {}
        for name in ("acme", "fresh"):
            made = tunerun("serve", "keys", "create", "acme", "--config", "server.yaml", cwd=root, env=env, timeout=60)
            assert made.returncode == 0, made.stderr
            keys[name] = made.stdout.strip()
        process = Server(root, free_port(), env)
        process.start()
        yield root, process, keys
        process.stop()


def api(server, key: str = "acme") -> openai.OpenAI:
    root, process, keys = server
    return openai.OpenAI(base_url=f"http://127.0.0.1:{process.port}/v1", api_key=keys[key], max_retries=0, timeout=60)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


def stream_body(port: int, path: str, headers: dict[str, str], total: int, chunk: bytes = b"[" * MIB,
                head: bytes = b"") -> tuple[int, int]:
    """POST a chunked body of ``total`` bytes, stopping once the server answers: (status, bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Transfer-Encoding: chunked",
                 *[f"{k}: {v}" for k, v in headers.items()]]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent, answered = 0, False
        for piece in [head] * bool(head) + [chunk] * (total // len(chunk)):
            try:
                conn.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            if select.select([conn], [], [], 0)[0]:
                answered = True
                break
        if not answered:
            try:
                conn.sendall(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        status_line = conn.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), sent


@pytest.mark.slow
def test_bodies_without_a_key_or_over_the_limit_cost_the_server_no_memory(server):
    root, process, keys = server
    before = rss_bytes(process.process.pid)
    status, sent = stream_body(process.port, "/v1/fine_tuning/jobs", {"Content-Type": "application/json"}, 200 * MIB)
    assert status == 401 and sent < 200 * MIB  # answered before the body was through
    status, _ = stream_body(process.port, "/v1/fine_tuning/jobs", {"Content-Type": "application/json",
                                                                  "Authorization": f"Bearer {keys['acme']}"}, 200 * MIB)
    assert status == 413
    grown = rss_bytes(process.process.pid) - before
    print(f"server RSS grew by {grown / MIB:.1f} MiB over two 200 MiB bodies")
    assert grown < 48 * MIB, f"the server grew by {grown / MIB:.0f} MiB"  # was 514 MiB for the first body alone


@pytest.mark.slow
def test_a_chunked_upload_over_the_limit_stops_at_the_limit(server):
    root, process, keys = server
    boundary = "limits-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{boundary}\r\n"
            "Content-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n").encode()
    line = b'{"prompt": "a", "completion": "b"}\n'
    status, sent = stream_body(process.port, "/v1/files", {
        "Authorization": f"Bearer {keys['acme']}", "Content-Type": f"multipart/form-data; boundary={boundary}"},
        200 * MIB, line * (MIB // len(line)), head)
    assert status == 413  # with an 8 MiB $TMPDIR the whole-body spool ended in a 500
    assert sent < 200 * MIB
    assert not [p for p in (root / "tmp").rglob("*") if p.is_file()]
    assert not list((root / "storage" / "runs" / "_service" / "files").glob("*/*.jsonl"))


@pytest.mark.slow
def test_a_full_storage_is_507_and_reads_keep_working(server):
    root, process, keys = server
    before = api(server).files.create(file=TICKETS.open("rb"), purpose="fine-tune")
    fill(root / "storage")
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            api(server).files.create(file=TICKETS.open("rb"), purpose="fine-tune")
        assert refused.value.status_code == 507 and refused.value.body["code"] == "storage_full"
        assert str(root) not in refused.value.body["message"]  # a tenant sees what it can act on
        # a key's first use writes its last-used time: on a full disk that write fails, the request does not
        assert [f.id for f in api(server, "fresh").files.list().data] == [before.id]
        assert api(server).fine_tuning.jobs.list().data == []
        assert api(server).files.retrieve(before.id).id == before.id
    finally:
        (root / "storage" / "ballast").unlink()
    deadline = time.monotonic() + 30
    while api(server).files.retrieve(before.id).status == "uploaded" and time.monotonic() < deadline:
        time.sleep(0.3)
    after = api(server).files.create(file=TICKETS.open("rb"), purpose="fine-tune")
    assert after.status == "uploaded"

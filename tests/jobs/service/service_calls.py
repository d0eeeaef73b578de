"""Calling the in-process app: the official `openai` client over Starlette's test transport, and uploads."""
from __future__ import annotations

from pathlib import Path

import openai
from fastapi.testclient import TestClient

REPO = Path(__file__).resolve().parents[3]
TICKETS = REPO / "examples" / "data" / "support_tickets.jsonl"
# The catalog model's job spec the service tests serve (MODEL: the stub model's folder)
TEMPLATE = """
name: support
model: {path: MODEL}
method: {kind: lora}
data: {eval_fraction: 0.1, max_seq_len: 128}
training: {epochs: 1, micro_batch_size: 2, global_batch_size: 8, learning_rate: 1.0e-3}
resources: {workers_per_node: 2}
"""


def client(app, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, max_retries=0,
                         http_client=TestClient(app, raise_server_exceptions=True))


def validated(app, project: str, file_id: str) -> None:
    """What the background validation does, done here and waited for."""
    service = app.state.service
    service.files.validate(project, file_id, Path(service.files.data_uri(project, file_id)))


def upload(app, key: str, project: str, path: Path):
    found = client(app, key).files.create(file=path.open("rb"), purpose="fine-tune")
    validated(app, project, found.id)
    return client(app, key).files.retrieve(found.id)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path

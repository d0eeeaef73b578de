"""API keys: one project each, shown once when created, kept only as a SHA-256 hash in the storage.

A key reads ``tr-<key id>-<secret>``: the id finds the record, the secret (32 random bytes) is checked against
the hash with `hmac.compare_digest`. Keys are high-entropy random strings, so a plain SHA-256 is the right
hash (a password KDF protects guessable secrets; these are not). ``<storage>/_service/keys.json`` holds the
records; `tunerun serve keys create|list|revoke` and the server share it, so a key created while the server
runs works at once and a revoked one stops working at once.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass

from tunerun.cluster.storage import backend_for
from tunerun.jobs.errors import TunerunError
from tunerun.jobs.spec import StorageSpec

KEYS = "_service/keys.json"
PROJECT_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,39}")
KEY_PATTERN = re.compile(r"tr-([0-9a-f]{12})-([A-Za-z0-9_-]{43})")
LAST_USED_EVERY_S = 60.0  # `last used` is kept to the minute: a write per request would cost more than it tells


class KeyStoreError(TunerunError):
    """A key or project the user named does not exist or cannot be made."""


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    project: str
    sha256: str
    created_at: float
    revoked_at: float | None = None
    last_used_at: float | None = None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, storage: StorageSpec):
        self.backend = backend_for(storage)
        self._lock = threading.Lock()
        self._last_noted: dict[str, float] = {}

    def _read(self) -> dict[str, KeyRecord]:
        if not self.backend.exists(KEYS):
            return {}
        return {r["key_id"]: KeyRecord(**r) for r in json.loads(self.backend.get(KEYS))["keys"]}

    def _write(self, records: dict[str, KeyRecord]) -> None:
        body = {"keys": [vars(r) for r in sorted(records.values(), key=lambda r: r.created_at)]}
        self.backend.put(KEYS, (json.dumps(body, indent=2) + "\n").encode("utf-8"))

    def create(self, project: str) -> tuple[KeyRecord, str]:
        """A new key for ``project``: (its record, the key itself — the only time anyone sees it)."""
        if not PROJECT_PATTERN.fullmatch(project):
            raise KeyStoreError(f"project {project!r}: use a lowercase letter, then up to 39 lowercase letters, digits "
                            "or '-' (e.g. support-team)")
        key_id = secrets.token_hex(6)
        key = f"tr-{key_id}-{secrets.token_urlsafe(32)}"
        record = KeyRecord(key_id=key_id, project=project, sha256=_digest(key), created_at=time.time())
        with self._lock:
            records = self._read()
            records[key_id] = record
            self._write(records)
        return record, key

    def list(self) -> list[KeyRecord]:
        return sorted(self._read().values(), key=lambda r: (r.project, r.created_at))

    def revoke(self, key_id: str) -> KeyRecord:
        with self._lock:
            records = self._read()
            if key_id not in records:
                known = ", ".join(records) or "none"
                raise KeyStoreError(f"no key with id {key_id!r} (key ids: {known}; `tunerun serve keys list` shows them)")
            records[key_id] = KeyRecord(**{**vars(records[key_id]), "revoked_at": time.time()})
            self._write(records)
            return records[key_id]

    def project_of(self, key: str) -> str | None:
        """The project of a valid, unrevoked key; None for anything else (wrong, revoked, malformed)."""
        record = self.record_of(key)
        return record.project if record else None

    def record_of(self, key: str) -> KeyRecord | None:
        """The record of a valid, unrevoked key; None for anything else."""
        match = KEY_PATTERN.fullmatch(key or "")
        record = self._read().get(match.group(1)) if match else None
        if record is None:
            hmac.compare_digest(_digest(key or ""), _digest(""))  # the same work whether or not the id exists
            return None
        if not hmac.compare_digest(_digest(key), record.sha256) or record.revoked_at is not None:
            return None
        self._note_use(record)
        return record

    def active(self, key_id: str) -> KeyRecord | None:
        """The record of key ``key_id`` while it is not revoked (a dashboard session lives only as long)."""
        record = self._read().get(key_id)
        if record is None or record.revoked_at is not None:
            return None
        self._note_use(record)
        return record

    def _note_use(self, record: KeyRecord) -> None:
        now = time.time()
        if now - self._last_noted.get(record.key_id, 0.0) < LAST_USED_EVERY_S:
            return
        self._last_noted[record.key_id] = now
        with self._lock:
            records = self._read()
            if record.key_id in records:
                records[record.key_id] = KeyRecord(**{**vars(records[record.key_id]), "last_used_at": now})
                self._write(records)

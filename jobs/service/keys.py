"""API keys: one project each, shown once when created, kept only as a SHA-256 hash in the storage.

A key reads ``tr-<key id>-<secret>``: the id finds the record, the secret (32 random bytes) is checked against
the hash with `hmac.compare_digest`. Keys are high-entropy random strings, so a plain SHA-256 is the right
hash (a password KDF protects guessable secrets; these are not).

The server, `tunerun serve keys create|list|revoke` and any other server on the same storage all write the
store at once, with no lock between them (on S3 there is none to take). So nothing is ever read, changed and
written back, which would let one writer undo another: each fact is its own object under
``<storage>/_service/keys/``, made by whoever owns it and by nobody else.

- ``<key id>.json``, the record, made once with an exclusive create (a conditional write on S3), never changed;
- ``<key id>.revoked``, the revocation, also an exclusive create, so the first revocation's time stands;
- ``<key id>.used``, the last use, simply overwritten: it is a convenience, kept to the minute, and a failure
  to write it (a full disk) is logged and never fails the request it came from.

A key created or revoked by the CLI works, or stops working, at the server's next request. Records and
revocations never change once made, so a server keeps each it has read: a request with a known key costs one
existence check of its revocation marker (a HEAD on S3), and nothing more once the key is revoked. Storage written by
an older tunerun keeps its records in one ``_service/keys.json``: its keys stay valid and are revoked through
the same marker; that file is read, never written again.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, replace

from tunerun.cluster.storage import backend_for
from tunerun.jobs.errors import StorageError, TunerunError
from tunerun.jobs.spec import StorageSpec

KEYS = "_service/keys"
LEGACY_KEYS = "_service/keys.json"
PROJECT_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,39}")


def project_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a project (keys, server.yaml's projects and webhooks take the same names), or None."""
    if PROJECT_PATTERN.fullmatch(name):
        return None
    return (f"{name[:60]!r} is not a project name: a lowercase letter, then up to 39 lowercase letters, digits or "
            "'-' (e.g. support-team)")
KEY_PATTERN = re.compile(r"tr-([0-9a-f]{12})-([A-Za-z0-9_-]{43})")
KEY_ID_PATTERN = re.compile(r"[0-9a-f]{12}")
KEY_OBJECT_PATTERN = re.compile(r"([0-9a-f]{12})\.(json|revoked|used)")
LAST_USED_EVERY_S = 60.0  # `last used` is kept to the minute: a write per request would cost more than it tells
logger = logging.getLogger("tunerun.serve")


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


def _object(key_id: str, kind: str) -> str:
    return f"{KEYS}/{key_id}.{kind}"


def _moment(data: bytes, field: str) -> float | None:
    try:
        return float(json.loads(data)[field])
    except (ValueError, KeyError, TypeError):
        return None


class KeyStore:
    def __init__(self, storage: StorageSpec):
        self.backend = backend_for(storage)
        self._last_noted: dict[str, float] = {}
        # Both are written once and never changed (see the module doc): each is read once per server.
        self._records: dict[str, KeyRecord] = {}
        self._revoked: dict[str, float] = {}
        self._legacy_records: dict[str, KeyRecord] | None = None

    def create(self, project: str) -> tuple[KeyRecord, str]:
        """A new key for ``project``: (its record, the key itself — the only time anyone sees it)."""
        problem = project_name_problem(project)
        if problem:
            raise KeyStoreError(problem)
        legacy = self._legacy()
        while True:  # 48-bit ids rarely collide; when they do, the exclusive create says so and we draw again
            key_id = secrets.token_hex(6)
            key = f"tr-{key_id}-{secrets.token_urlsafe(32)}"
            record = KeyRecord(key_id=key_id, project=project, sha256=_digest(key), created_at=time.time())
            body = {"key_id": key_id, "project": project, "sha256": record.sha256, "created_at": record.created_at}
            if key_id not in legacy and self.backend.put_new(_object(key_id, "json"), _json(body)):
                return record, key

    def list(self) -> list[KeyRecord]:
        """Every key, revoked ones too, with when it was last used, by project and age."""
        records = self._legacy()
        names = [KEY_OBJECT_PATTERN.fullmatch(name) for name in self.backend.children(KEYS)]
        for key_id in {m.group(1) for m in names if m and m.group(2) == "json"}:
            records[key_id] = self._stored(key_id) or records.get(key_id)
        found = [self._with_state(r, with_last_use=True) for r in records.values() if r is not None]
        return sorted(found, key=lambda r: (r.project, r.created_at))

    def revoke(self, key_id: str) -> KeyRecord:
        """Stop key ``key_id`` from working; revoking it again keeps the first revocation's time."""
        record = self._record(key_id)
        if record is None:
            known = ", ".join(r.key_id for r in self.list()) or "none"
            raise KeyStoreError(f"no key with id {key_id!r} (key ids: {known}; `tunerun serve keys list` shows them)")
        self.backend.put_new(_object(key_id, "revoked"), _json({"revoked_at": time.time()}))
        return self._with_state(record)

    def project_of(self, key: str) -> str | None:
        """The project of a valid, unrevoked key; None for anything else (wrong, revoked, malformed)."""
        record = self.record_of(key)
        return record.project if record else None

    def record_of(self, key: str) -> KeyRecord | None:
        """The record of a valid, unrevoked key; None for anything else."""
        match = KEY_PATTERN.fullmatch(key or "")
        record = self._record(match.group(1)) if match else None
        if record is None:
            hmac.compare_digest(_digest(key or ""), _digest(""))  # the same work whether or not the id exists
            return None
        if not hmac.compare_digest(_digest(key), record.sha256):
            return None
        return self._in_use(record)

    def active(self, key_id: str) -> KeyRecord | None:
        """The record of key ``key_id`` while it is not revoked (a dashboard session lives only as long)."""
        record = self._record(key_id)
        return self._in_use(record) if record is not None else None

    def _in_use(self, record: KeyRecord) -> KeyRecord | None:
        record = self._with_state(record)
        if record.revoked_at is not None:
            return None
        self._note_use(record)
        return record

    def _record(self, key_id: str) -> KeyRecord | None:
        if not KEY_ID_PATTERN.fullmatch(key_id or ""):  # it becomes part of a path
            return None
        found = self._records.get(key_id) or self._stored(key_id) or self._legacy().get(key_id)
        if found is not None:
            self._records[key_id] = found
        return found

    def _stored(self, key_id: str) -> KeyRecord | None:
        try:
            return KeyRecord(**json.loads(self.backend.get(_object(key_id, "json"))))
        except (FileNotFoundError, ValueError):  # a record caught before its first bytes is not handed out yet
            return None

    def _legacy(self) -> dict[str, KeyRecord]:
        """keys.json of an older tunerun: read once when there is one (it is never written again); while there is
        none, only a key id with no record of its own asks again."""
        if self._legacy_records is None:
            try:
                self._legacy_records = {r["key_id"]: KeyRecord(**r)
                                        for r in json.loads(self.backend.get(LEGACY_KEYS))["keys"]}
            except FileNotFoundError:
                return {}
        return dict(self._legacy_records)

    def _with_state(self, record: KeyRecord, with_last_use: bool = False) -> KeyRecord:
        """``record`` with its revocation (and, for listing, its last use) as the storage knows them now."""
        revoked_at = record.revoked_at or self._revoked.get(record.key_id)  # a legacy record may carry one
        if revoked_at is None and self.backend.exists(_object(record.key_id, "revoked")):
            # A marker caught before its first bytes is a revocation under way: it counts from now.
            moment = self._read_moment(record.key_id, "revoked", "revoked_at")
            revoked_at = moment or time.time()
            if moment is not None:  # the marker's own time stands once readable: kept, never asked again
                self._revoked[record.key_id] = moment
        last_used_at = record.last_used_at
        if with_last_use:
            last_used_at = self._read_moment(record.key_id, "used", "last_used_at") or last_used_at
        return replace(record, revoked_at=revoked_at, last_used_at=last_used_at)

    def _read_moment(self, key_id: str, kind: str, field: str) -> float | None:
        try:
            return _moment(self.backend.get(_object(key_id, kind)), field)
        except FileNotFoundError:
            return None

    def _note_use(self, record: KeyRecord) -> None:
        now = time.time()
        if now - self._last_noted.get(record.key_id, 0.0) < LAST_USED_EVERY_S:
            return
        self._last_noted[record.key_id] = now  # also when it fails: a full disk is logged once a minute, not per call
        try:
            self.backend.put(_object(record.key_id, "used"), _json({"last_used_at": now}))
        except (OSError, StorageError) as exc:
            logger.warning("could not note the last use of key %s (%s); the request goes on", record.key_id, exc)


def _json(body: dict) -> bytes:
    return (json.dumps(body, indent=2) + "\n").encode("utf-8")

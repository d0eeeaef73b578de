"""Dashboard sessions: a signed cookie that names a key, never the key itself.

Signing in with a project's API key sets ``tunerun_session`` (HttpOnly, SameSite=Strict): the key's id, its
project, a random nonce and an expiry, signed with HMAC-SHA256 under a secret kept in the storage
(``_service/session-secret``, made once with an exclusive create), so every server on one storage accepts the
same sessions and a restart signs nobody out. Each request checks the key is still unrevoked: revoking the key
ends its sessions at once.

Deleting the cookie at sign-out is not enough: a copy of it (a shared machine, a proxy log) would work until it
expires. So signing out also ends the session in the storage, where every server looks:
``_service/sessions/ended/<expiry>-<nonce>``, an exclusive create that nobody changes. A marker is only needed
until its session would have expired anyway; its name starts with that expiry, so each start forgets the oldest
ones without reading them.

CSRF: a state-changing request that authenticates with the cookie must carry the session's CSRF token (derived
from the nonce, so it needs no storage) in the ``X-CSRF-Token`` header or a form's ``csrf_token`` field. The
sign-in form itself is protected by a double-submit token (a cookie and a field that must match).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import secrets
import time
from dataclasses import dataclass

from tunerun.cluster.storage import backend_for
from tunerun.jobs.errors import StorageError
from tunerun.jobs.service.keys import KeyRecord
from tunerun.jobs.spec import StorageSpec

SECRET = "_service/session-secret"
SESSION_COOKIE = "tunerun_session"
SIGNIN_COOKIE = "tunerun_signin"
CSRF_HEADER = "x-csrf-token"
ENDED = "_service/sessions/ended"
ENDED_PATTERN = re.compile(r"(\d{12})-[0-9a-f]{32}")
NONCE_PATTERN = re.compile(r"[0-9a-f]{32}")
# Another server's clock may run behind ours; while it does, it still takes a session ours calls expired.
FORGET_AFTER_EXPIRY_S = 3600.0
FORGET_AT_MOST = 1000  # per start: one after a long quiet spell must not wait on every old marker's delete
SECRET_WAIT_S = 5.0


@dataclass(frozen=True)
class Session:
    key_id: str
    project: str
    nonce: str
    expires_at: float


class SessionSigner:
    def __init__(self, storage: StorageSpec, lifetime_s: float):
        self.lifetime_s = lifetime_s
        self.backend = backend_for(storage)
        self._secret = _shared_secret(self.backend)
        self.forget_expired()

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest()

    def issue(self, key: KeyRecord, now: float | None = None) -> str:
        """The cookie value of a new session for ``key``."""
        body = {"k": key.key_id, "p": key.project, "n": secrets.token_hex(16),
                "e": (now or time.time()) + self.lifetime_s}
        payload = base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode("utf-8"))
        return f"{payload.decode('ascii')}.{self._sign(payload)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie holds if its signature checks and it has neither expired nor ended; else None."""
        payload, _, signature = (cookie or "").encode("ascii", "replace").partition(b".")
        if not payload or not hmac.compare_digest(self._sign(payload).encode("ascii"), signature):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(payload))
            session = Session(str(body["k"]), str(body["p"]), str(body["n"]), float(body["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if not NONCE_PATTERN.fullmatch(session.nonce) or session.expires_at <= time.time():
            return None
        return None if self.is_ended(session) else session

    def end(self, session: Session) -> None:
        """End ``session`` on every server of this storage: copies of its cookie stop working too."""
        self.backend.put_new(f"{ENDED}/{_ended_name(session)}", f"{session.expires_at}\n".encode("ascii"))

    def is_ended(self, session: Session) -> bool:
        return self.backend.exists(f"{ENDED}/{_ended_name(session)}")

    def forget_expired(self, now: float | None = None) -> None:
        """Delete the markers of ended sessions that have expired since (they are refused for that already)."""
        cutoff = (now or time.time()) - FORGET_AFTER_EXPIRY_S
        for name in self.backend.children(ENDED)[:FORGET_AT_MOST]:
            marker = ENDED_PATTERN.fullmatch(name)
            if marker is None:
                continue
            if int(marker.group(1)) >= cutoff:
                break  # names sort by expiry: every later marker is still needed
            self.backend.delete_prefix(f"{ENDED}/{name}")

    def csrf_token(self, session: Session) -> str:
        return self._sign(f"csrf:{session.nonce}".encode("ascii"))[:32]

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return hmac.compare_digest(self.csrf_token(session), token or "")


def _ended_name(session: Session) -> str:
    # Rounded up, so a marker is never forgotten before its session expires; 12 digits sort like the times do.
    return f"{math.ceil(session.expires_at):012d}-{session.nonce}"


def _shared_secret(backend) -> bytes:
    """The storage's signing secret, made by the first server to start; every later one reads it."""
    backend.put_new(SECRET, secrets.token_hex(32).encode("ascii"))  # only the first server's lands
    deadline = time.monotonic() + SECRET_WAIT_S
    while True:
        secret = backend.get(SECRET).strip()
        if secret:
            return secret
        # An exclusive create that makes the file before writing it (older tunerun) can be caught in between,
        # or stop there for good. Signing with an empty secret would let anyone forge a session: wait for bytes.
        if time.monotonic() > deadline:
            raise StorageError(f"{backend.uri(SECRET)} is empty (a server stopped while making it): delete it and "
                               "start the server again (everyone signs in again)")
        time.sleep(0.05)


def signin_token() -> str:
    """The double-submit token of the sign-in form (before there is a session to bind a token to)."""
    return secrets.token_urlsafe(24)


def tokens_match(cookie: str | None, field: str | None) -> bool:
    return bool(cookie) and hmac.compare_digest(cookie or "", field or "")

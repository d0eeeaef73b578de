"""Dashboard sessions: a signed cookie that names a key, never the key itself.

Signing in with a project's API key sets ``tunerun_session`` (HttpOnly, SameSite=Strict): the key's id, its
project, a random nonce and an expiry, signed with HMAC-SHA256 under a secret kept in the storage
(``_service/session-secret``, made once with an exclusive create), so every server on one storage accepts the
same sessions and a restart signs nobody out. Each request checks the key is still unrevoked: revoking the key
ends its sessions at once. Signing out deletes the cookie.

CSRF: a state-changing request that authenticates with the cookie must carry the session's CSRF token (derived
from the nonce, so it needs no storage) in the ``X-CSRF-Token`` header or a form's ``csrf_token`` field. The
sign-in form itself is protected by a double-submit token (a cookie and a field that must match).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from tunerun.cluster.storage import backend_for
from tunerun.jobs.service.keys import KeyRecord
from tunerun.jobs.spec import StorageSpec

SECRET = "_service/session-secret"
SESSION_COOKIE = "tunerun_session"
SIGNIN_COOKIE = "tunerun_signin"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Session:
    key_id: str
    project: str
    nonce: str
    expires_at: float


class SessionSigner:
    def __init__(self, storage: StorageSpec, lifetime_s: float):
        self.lifetime_s = lifetime_s
        backend = backend_for(storage)
        backend.put_new(SECRET, secrets.token_hex(32).encode("ascii"))  # only the first server's lands
        self._secret = backend.get(SECRET).strip()

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest()

    def issue(self, key: KeyRecord, now: float | None = None) -> str:
        """The cookie value of a new session for ``key``."""
        body = {"k": key.key_id, "p": key.project, "n": secrets.token_hex(16),
                "e": (now or time.time()) + self.lifetime_s}
        payload = base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode("utf-8"))
        return f"{payload.decode('ascii')}.{self._sign(payload)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie holds if its signature checks and it has not expired; None otherwise."""
        payload, _, signature = (cookie or "").encode("ascii", "replace").partition(b".")
        if not payload or not hmac.compare_digest(self._sign(payload).encode("ascii"), signature):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(payload))
            session = Session(str(body["k"]), str(body["p"]), str(body["n"]), float(body["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires_at > time.time() else None

    def csrf_token(self, session: Session) -> str:
        return self._sign(f"csrf:{session.nonce}".encode("ascii"))[:32]

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return hmac.compare_digest(self.csrf_token(session), token or "")


def signin_token() -> str:
    """The double-submit token of the sign-in form (before there is a session to bind a token to)."""
    return secrets.token_urlsafe(24)


def tokens_match(cookie: str | None, field: str | None) -> bool:
    return bool(cookie) and hmac.compare_digest(cookie or "", field or "")

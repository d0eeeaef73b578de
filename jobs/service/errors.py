"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the status code that fits.

Raised anywhere in the service and turned into one response by the app's handler; a 4xx also says
``x-should-retry: false`` (the same request cannot succeed later), a 5xx leaves retrying to the client.
"""
from __future__ import annotations

import re

# What a tenant cannot act on: the server's paths and the admin's commands (the run folder keeps the whole text)
_ADMIN_CLAUSE = re.compile(r"[^;]*(?:\btunerun [a-z]+ |--resume|--storage|its log: )[^;]*")
_SERVER_PATH = re.compile(r"(?:s3://|(?<![\w.:/])/)[\w.@%+=-]+(?:/[\w.@%+=-]*)+")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(status, message, param, code, type_)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers: dict[str, str] = {}  # e.g. Retry-After on a 503
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                              409: "invalid_request_error", 413: "invalid_request_error",
                              422: "invalid_request_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def not_found(what: str, ident: str, param: str | None = None) -> ApiError:
    # Also for another project's objects: a 404 does not reveal that they exist.
    return ApiError(404, f"No such {what}: {ident}", param, "not_found")


def tenant_text(message: str) -> str:
    """``message`` as a tenant sees it: clauses that give the admin's commands dropped, server paths elided."""
    clauses = [c.strip() for c in message.split(";")]
    kept = [c for c in clauses if c and not _ADMIN_CLAUSE.fullmatch(c)]
    return "; ".join(_SERVER_PATH.sub(_last_part, c) for c in kept) or "see the server's log"


def _last_part(found: re.Match) -> str:
    """A path shown by its last part ('…/file-1a2b.jsonl'): enough to know which of one's own things it was."""
    return "…/" + found.group(0).rstrip("/").rsplit("/", 1)[-1]

"""Request protection in front of the endpoint: API keys, per-client rate limits, body size.

One pure ASGI middleware does all three before FastAPI parses anything, so a request without
a key or over its rate is refused without reading its body, and a body over the limit is never
parsed. Refusals use OpenAI's error shape, so OpenAI clients raise their usual exceptions.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

# status -> error class (the label of genops:request_errors_total) and OpenAI error type.
ERROR_CLASSES = {400: "invalid_request", 401: "authentication", 403: "permission", 404: "not_found",
                 405: "method_not_allowed", 408: "timeout", 413: "too_large", 422: "invalid_request",
                 429: "rate_limit", 499: "cancelled", 504: "timeout"}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error", 504: "timeout_error"}


def error_class(status: int) -> str:
    return ERROR_CLASSES.get(status, "server" if status >= 500 else "invalid_request")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


DIGEST_PREFIX = "sha256:"
_HEX = frozenset("0123456789abcdef")


def parse_api_keys(raw: str | None) -> tuple[str, ...]:
    """Comma-separated keys (blanks ignored), as ``GENOPS_API_KEYS`` holds them: each a key, or
    ``sha256:<hex digest of the key>`` so that the server side never stores the key itself."""
    return tuple(k.strip() for k in (raw or "").split(",") if k.strip())


def key_digest(key: str) -> str:
    """The ``sha256:<hex>`` entry that lets an endpoint accept ``key`` without storing it."""
    return DIGEST_PREFIX + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _stored_digest(entry: str) -> bytes:
    if entry.startswith(DIGEST_PREFIX):
        hexdigest = entry[len(DIGEST_PREFIX):].lower()
        if len(hexdigest) != 64 or not set(hexdigest) <= _HEX:
            raise ValueError(f"API key entry '{DIGEST_PREFIX}...' must be followed by 64 hex digits (the sha256 of "
                             f"the key; `genops keys new` prints one), got {len(hexdigest)} characters")
        return bytes.fromhex(hexdigest)
    return hashlib.sha256(entry.encode("utf-8", "surrogateescape")).digest()


def plaintext_keys(entries: Iterable[str]) -> tuple[str, ...]:
    """The entries that are keys, not digests."""
    return tuple(e for e in entries if not e.startswith(DIGEST_PREFIX))


class ApiKeys:
    """Bearer keys, held only as sha256 digests (a key given in plain is hashed on arrival) and
    compared in constant time: the sent key's digest is compared with every configured one,
    whatever matches."""

    def __init__(self, keys: Iterable[str]):
        keys = list(keys)
        if any(not k for k in keys):
            raise ValueError("an API key must not be empty")
        self._digests = [_stored_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def client_id(self, index: int) -> str:
        """A stable name for the key at ``index`` that does not reveal it (rate-limit buckets)."""
        return "key:" + self._digests[index].hex()[:16]

    def match(self, authorization: str | None) -> int | None:
        """Index of the key sent as ``Authorization: Bearer <key>``, or None."""
        if not authorization:
            return None
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        sent = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
        found = None
        for i, digest in enumerate(self._digests):
            if hmac.compare_digest(sent, digest) and found is None:
                found = i
        return found


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests a minute on average, bursts of up to
    ``burst``. ``per_minute <= 0`` turns limiting off."""

    MAX_CLIENTS = 10_000

    def __init__(self, per_minute: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = max(0.0, per_minute) / 60.0
        self.capacity = float(burst if burst is not None else max(1, math.ceil(per_minute)))
        if self.rate and self.capacity < 1:
            raise ValueError(f"rate limit burst must be at least 1, got {burst}")
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, time)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, client: str) -> float:
        """0 when the request may go; else the seconds until it could."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                self._prune(now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        if len(self._buckets) <= self.MAX_CLIENTS:
            return
        full = [c for c, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.capacity]
        for c in full:  # a full bucket holds no state worth keeping
            del self._buckets[c]


class ProtectionMiddleware:
    """API keys and rate limits on ``protected_prefix`` paths, a body size limit on every request.

    ``on_error(status, message, param, code, headers)`` builds the refusal (an ASGI response);
    the app passes one that also counts the error class in its metrics."""

    def __init__(self, app, *, api_keys: ApiKeys, limiter: RateLimiter, max_body_bytes: int,
                 on_error: Callable[..., Any], protected_prefix: str = "/v1/"):
        self.app = app
        self.api_keys = api_keys
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes
        self.on_error = on_error
        self.prefix = protected_prefix
        # A refused body is still read (and dropped) up to this much, so the client gets the 413
        # instead of a connection reset while it is still sending.
        self.drain_bytes = max(4 * max_body_bytes, 4 << 20)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["path"].startswith(self.prefix):
            refusal = self._admit(scope, headers)
            if refusal is not None:
                return await refusal(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                return await self.on_error(400, f"Content-Length {declared!r} is not a number")(scope, receive, send)
            if declared_n > self.max_body_bytes:
                if declared_n <= self.drain_bytes:
                    await self._drain(receive, declared_n)
                return await self._too_large(declared_n)(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, self.drain_bytes - len(body))
                return await self._too_large(len(body), at_least=True)(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _admit(self, scope, headers: dict[str, str]):
        client = None
        if self.api_keys:
            sent = headers.get("authorization")
            index = self.api_keys.match(sent)
            if index is None:
                what = "No API key provided" if not sent else "Incorrect API key provided"
                return self.on_error(401, f"{what}: send 'Authorization: Bearer <key>' with a key this endpoint "
                                          f"accepts", code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})
            client = self.api_keys.client_id(index)
        if self.limiter.enabled:
            if client is None:
                client = "ip:" + ((scope.get("client") or ("unknown",))[0])
            wait = self.limiter.acquire(client)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return self.on_error(429, f"Rate limit reached: at most {self.limiter.rate * 60:g} requests per "
                                          f"minute per client; retry in {retry} s", code="rate_limit_exceeded",
                                     headers={"Retry-After": str(retry)})
        return None

    def _too_large(self, size: int, at_least: bool = False):
        got = f"more than {self.max_body_bytes}" if at_least else str(size)
        return self.on_error(413, f"Request body of {got} bytes is over this endpoint's limit of "
                                  f"{self.max_body_bytes} bytes", code="request_too_large")

    @staticmethod
    async def _drain(receive, limit: int) -> None:
        seen = 0
        while seen <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

"""One small client for servers speaking the OpenAI HTTP protocol (vLLM, ``editr1 serve-reward``, a hosted
API), shared by the served reward (:mod:`editr1.rewards.served`) and the served benchmark judge
(:mod:`editr1.evaluation.judges`).

:meth:`OpenAIClient.post` sends one JSON request and parses the answer with the caller's function:

* transport failures (connection refused or reset, timeouts), retryable HTTP statuses (408, 409, 429,
  5xx, see :func:`retryable`) and answers the parser rejects are retried a bounded number of times with
  exponential backoff; a request that still fails returns ``None``;
* any other non-200 status is a configuration error (bad model name, bad key, request too large) that
  retrying cannot fix: it raises the caller's exception type with the server's message;
* everything is counted by reason into a ``Counter`` the caller owns: ``requests``, ``retries``,
  ``errors/<reason>`` per failed attempt and ``failed/<reason>`` per request given up on, with reasons
  ``connection``, ``timeout``, ``http_<status>`` and ``malformed_response``.

The API key is read from a named environment variable when the client is made and sent as a bearer
token; it is never logged. The client is synchronous and safe to share between threads: at most
``max_concurrency`` requests are on the wire at once, whatever the number of calling threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

# What reading an answer may raise when the answer is bad: the request is retried, then counted malformed.
# Beyond a parser's own ValueError: the shape errors Python raises on JSON of the wrong shape (KeyError,
# IndexError, TypeError, AttributeError), arithmetic on absurd numbers (OverflowError) and JSON nested
# too deep to decode (RecursionError). A server's answer never crashes the caller.
PARSE_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, ArithmeticError, RecursionError)


def retryable(status: int) -> bool:
    """HTTP statuses worth retrying (timeout, conflict, rate limit, server error); other non-200s are
    configuration errors that retrying cannot fix."""
    return status in (408, 409, 429) or status >= 500


def error_message(response) -> str:
    """The server's error message from an OpenAI-style error body, else the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except Exception:
        return response.text[:200]


class OpenAIClient:
    """A pooled ``httpx`` client for one OpenAI-compatible API root, with bounded retries and counting.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``; request paths are relative to it.
        api_key_env: environment variable holding the API key (unset or ``None``: no key is sent).
        timeout: seconds per attempt.
        max_retries: retries of a request after its first attempt fails (then it returns ``None``).
        retry_backoff: first retry delay in seconds; doubles each retry.
        max_concurrency: requests on the wire at once (also the connection-pool size).
        counts: the ``Counter`` to count into (default: a new one, as ``self.counts``).
        lock: held while counting; pass the lock under which the owner reads ``counts``.
        refused: the exception raised for a configuration error.
        label: who refused, in that exception's message (``"<label> <base_url> refused the request
            (HTTP <status>): <server's message>"``).
    """

    def __init__(
        self,
        base_url: str,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        max_concurrency: int = 16,
        counts: Counter | None = None,
        lock: threading.Lock | None = None,
        refused: type[Exception] = RuntimeError,
        label: str = "server",
    ) -> None:
        import httpx

        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("OpenAI client: need max_concurrency >= 1, max_retries >= 0, timeout > 0")
        self.base_url = base_url
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.counts: Counter = counts if counts is not None else Counter()
        self.refused = refused
        self.label = label
        self._lock = lock if lock is not None else threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._client = httpx.Client(
            base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout, limits=limits
        )

    def post(self, path: str, body: dict, parse: Callable[[Any], T]) -> T | None:
        """POST ``body`` as JSON to ``path`` and return ``parse`` of the JSON answer, or ``None`` when every
        attempt failed (see the module docstring). ``parse`` raising one of ``PARSE_ERRORS`` marks the
        answer malformed. Raises ``refused`` for a configuration error."""
        import httpx

        reason = "unknown"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            self._count("requests")
            try:
                with self._slots:
                    response = self._client.post(path, json=body)
            except httpx.TimeoutException:
                reason = "timeout"
            except httpx.TransportError:
                reason = "connection"
            else:
                status = response.status_code
                if retryable(status):
                    reason = f"http_{status}"
                elif status != 200:
                    raise self.refused(
                        f"{self.label} {self.base_url} refused the request (HTTP {status}): {error_message(response)}"
                    )
                else:
                    try:
                        return parse(response.json())  # a body that is not JSON raises ValueError too
                    except PARSE_ERRORS as exc:
                        reason = "malformed_response"
                        self._malformed(exc)
            self._count(f"errors/{reason}")
        self._count(f"failed/{reason}")
        return None

    def close(self) -> None:
        self._client.close()

    def _malformed(self, exc: BaseException) -> None:
        """Say why an answer was rejected: a warning the first time, then at debug level."""
        with self._lock:
            first = not self.counts["errors/malformed_response"]
        message = str(exc)[:200] if not isinstance(exc, RecursionError) else "JSON nested too deep"
        (log.warning if first else log.debug)(
            "%s %s: malformed answer (%s: %s)", self.label, self.base_url, type(exc).__name__, message
        )

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

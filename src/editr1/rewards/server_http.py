"""The HTTP side of ``editr1 serve-reward``, shared by the MLLM judge server and the scalar reward server: JSON in
and out (never pickle), request limits, a socket timeout, an optional bearer token compared in constant time,
errors as JSON (the standard library's own included) without tracebacks, and data-URL images decoded within the
pixel limit. The standard library's ``http.server``: :mod:`editr1.rewards.server` says why."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from editr1.images import ImageTooLarge, data_url_bytes, decode_image

log = logging.getLogger("editr1.rewards.server")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RequestError(Exception):
    """A client error: becomes a JSON error response with this status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class Limits:
    """What one request may ask for (over a limit: a 4xx naming it) and how the server batches and waits."""

    max_request_bytes: int = 32 * 1024 * 1024  # body size (413)
    max_images: int = 8  # images per request (413)
    max_image_pixels: int = 16 * 1024 * 1024  # pixels per decoded image (413)
    max_prompt_chars: int = 32_768  # characters of text over all messages (400)
    max_prompt_tokens: int = 8_192  # tokens of the chat text, an image placeholder once (images: the limits above)
    max_tokens: int = 512  # completion tokens per request
    max_top_logprobs: int = 20  # as vLLM's default max_logprobs
    max_batch: int = 8  # one-token requests per forward pass
    batch_wait_s: float = 0.005  # how long the batcher waits for more requests
    socket_timeout_s: float = 60.0  # a connection silent this long (headers, body, keep-alive) is closed


def _brief(exc: BaseException) -> str:
    """An exception's first line, shortened: what a refused request is told (never a traceback)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def decode_data_url(url: str, limits: Limits) -> Image.Image:
    """A ``data:image/...;base64,`` URL → RGB image, within the pixel limit."""
    try:
        raw = data_url_bytes(url)
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None
    try:
        return decode_image(raw, limits.max_image_pixels, convert=lambda img: img.convert("RGB"))
    except ImageTooLarge as exc:
        raise RequestError(413, str(exc)) from None
    except Exception:
        raise RequestError(400, "image could not be decoded") from None


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256  # many clients connect at once (the stdlib default of 5 drops connections)
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    server_ref: Any  # the server object: api_key, model_name, limits, routes
    protocol_version = "HTTP/1.1"
    server_version = "editr1-serve-reward"
    timeout = 60.0  # socket timeout; the server sets Limits.socket_timeout_s

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if status >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client went away or stopped reading
            self.close_connection = True

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", **headers: str) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's protocol errors (bad request line, unknown method, ...) as JSON, not HTML."""
        self._error(code, message or self.responses.get(code, ("error",))[0], "protocol_error")

    def _not_allowed(self) -> None:
        self._error(405, f"method {self.command} not allowed; use GET or POST", "method_not_allowed", Allow="GET, POST")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _not_allowed  # noqa: N815 - stdlib names

    def _authorised(self) -> bool:
        key = self.server_ref.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode("utf-8"), f"Bearer {key}".encode())

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self._authorised():
            return self._error(401, "missing or wrong bearer token", "authentication_error")
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            model = {"id": self.server_ref.model_name, "object": "model", "created": 0, "owned_by": "editr1"}
            return self._send(200, {"object": "list", "data": [model]})
        if self.path.rstrip("/") == "/health":
            return self._send(200, {"status": "ok"})
        self._error(404, f"no route {self.path}", "not_found_error")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        limits = self.server_ref.limits
        try:
            if not self._authorised():
                return self._error(401, "missing or wrong bearer token", "authentication_error")
            path = self.path.rstrip("/")
            route = self.server_ref.routes.get(path if path.startswith("/v1/") else "/v1" + path)
            if route is None:
                return self._error(404, f"no route {self.path}", "not_found_error")
            length = self.headers.get("Content-Length")
            if length is None or not (length.isascii() and length.isdigit()):
                return self._error(411, "Content-Length is required")
            if int(length) > limits.max_request_bytes:
                return self._error(413, f"request of {length} bytes exceeds {limits.max_request_bytes}")
            try:
                raw = self.rfile.read(int(length))
            except TimeoutError:
                return self._error(408, f"request body not received within {limits.socket_timeout_s} s")
            try:
                body = json.loads(raw)
            except RecursionError:
                return self._error(400, "request body is nested too deeply")
            except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
                return self._error(400, "request body is not valid JSON")
            self._send(200, route(body))
        except RequestError as exc:
            self._error(exc.status, str(exc), exc.kind)
        except Exception:
            log.exception("serve-reward: request failed")
            self._error(500, "internal error while judging", "server_error")


def make_httpd(server: Any, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server answering for ``server``: its ``routes`` (path under ``/v1`` → function of the JSON body
    returning the JSON answer), ``api_key``, ``model_name`` and ``limits``."""
    handler = type("Handler", (_Handler,), {"server_ref": server, "timeout": server.limits.socket_timeout_s})
    return _HTTPServer((host, port), handler)


class HTTPService:
    """What both servers share: listening (with a warning when exposed without a token), ``url``, ``start`` in a
    background thread, ``serve_forever`` and ``shutdown``; a subclass sets ``routes``, ``api_key``, ``model_name``
    and ``limits``, calls :meth:`listen`, and releases its own resources in :meth:`close`."""

    def listen(self, host: str, port: int) -> None:
        if host not in LOOPBACK and not self.api_key:
            log.warning("serve-reward is listening on %s without an API key: anyone who can reach it can use it", host)
        self.httpd = make_httpd(self, host, port)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, name="editr1-reward-server", daemon=True).start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.close()

    def close(self) -> None:
        """Release what the service holds besides the socket."""

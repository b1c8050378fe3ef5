"""``editr1 serve-reward``: a small OpenAI-compatible server hosting a transformers MLLM judge.

For users without vLLM, and for the tests. It speaks the subset of the chat-completions protocol the
reward client uses — ``POST /v1/chat/completions`` with images as base64 ``data:`` URLs, greedy
decoding, ``logprobs`` / ``top_logprobs`` — plus ``GET /v1/models`` and ``GET /health``.

Safe by default: binds 127.0.0.1, JSON only (never pickle), optional bearer token (read from an
environment variable, compared in constant time), limits on request bytes, images per request and
pixels per image, no fetching of remote image URLs, and errors as JSON without tracebacks.
Concurrent one-token requests are batched into one forward pass.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from PIL import Image

from editr1.images import ImageTooLarge, data_url_bytes, decode_image
from editr1.rewards.mllm import MLLMJudge, Quantization

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RequestError(Exception):
    """A client error: becomes a JSON error response with this status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class Limits:
    max_request_bytes: int = 32 * 1024 * 1024  # body size
    max_images: int = 8  # images per request
    max_image_pixels: int = 16 * 1024 * 1024  # pixels per decoded image
    max_tokens: int = 512  # completion tokens per request
    max_top_logprobs: int = 20  # as vLLM's default max_logprobs
    max_batch: int = 8  # one-token requests per forward pass
    batch_wait_s: float = 0.005  # how long the batcher waits for more requests


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


def parse_messages(messages, limits: Limits) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI chat messages → processor messages (``{"type": "image"}`` parts) and the images."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list")
    out, images = [], []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, "each message needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise RequestError(400, "message content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                if len(images) >= limits.max_images:
                    raise RequestError(413, f"more than {limits.max_images} images in one request")
                images.append(decode_data_url(part["image_url"].get("url"), limits))
                parts.append({"type": "image"})
            else:
                raise RequestError(400, f"unsupported content part {kind!r}; use text and image_url")
        out.append({"role": m["role"], "content": parts})
    return out, images


@dataclass
class _Job:
    text: str
    images: list[Image.Image]
    top: int
    future: Future


class Batcher:
    """Runs one-token requests that arrive together as one left-padded forward pass."""

    def __init__(self, judge: MLLMJudge, limits: Limits) -> None:
        self.judge = judge
        self.limits = limits
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="editr1-reward-batcher", daemon=True)
        self.thread.start()

    def submit(self, text: str, images: list[Image.Image], top: int) -> Future:
        job = _Job(text, images, top, Future())
        self.jobs.put(job)
        return job.future

    def stop(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.limits.batch_wait_s
            while len(batch) < self.limits.max_batch:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)
                    break
                batch.append(nxt)
            try:
                logits = self.judge.next_token_logits([j.text for j in batch], [j.images for j in batch])
                logprobs = torch.log_softmax(logits, dim=-1).cpu()
                for j, lp in zip(batch, logprobs):
                    j.future.set_result(lp)
            except Exception as exc:  # every waiting request gets the failure, the server lives on
                log.exception("judge forward pass failed")
                for j in batch:
                    j.future.set_exception(exc)


class RewardServer:
    """The HTTP server. ``start()`` serves in a background thread; ``serve_forever()`` blocks."""

    def __init__(
        self,
        judge: MLLMJudge,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        model_name: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.judge = judge
        self.limits = limits or Limits()
        self.api_key = api_key
        self.model_name = model_name or judge.name
        if host not in LOOPBACK and not api_key:
            log.warning("serve-reward is listening on %s without an API key: anyone who can reach it can use it", host)
        judge.load(judge.device)
        self.batcher = Batcher(judge, self.limits)
        handler = type("Handler", (_Handler,), {"server_ref": self})
        self.httpd = _HTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> RewardServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="editr1-reward-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.stop()

    # ------------------------------------------------------------------------------- completions
    def complete(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.limits.max_tokens:
            raise RequestError(400, f"max_tokens must be an integer in [1, {self.limits.max_tokens}]")
        temperature = body.get("temperature", 0)
        if temperature not in (0, 0.0, None):
            raise RequestError(400, "only greedy decoding is served: temperature must be 0")
        if body.get("n", 1) != 1:
            raise RequestError(400, "n must be 1")
        want_logprobs = bool(body.get("logprobs", False))
        top = body.get("top_logprobs", 0) or 0
        if not isinstance(top, int) or not 0 <= top <= self.limits.max_top_logprobs:
            raise RequestError(400, f"top_logprobs must be an integer in [0, {self.limits.max_top_logprobs}]")
        if top and not want_logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true")
        messages, images = parse_messages(body.get("messages"), self.limits)
        text = self.judge.chat_text(messages)
        if max_tokens == 1:
            logprobs = self.batcher.submit(text, images, top).result()
            token_ids, steps = [int(logprobs.argmax())], [logprobs]
        else:
            token_ids, steps = self._generate(text, images, max_tokens)
        tok = self.judge.processor.tokenizer
        content = tok.decode(token_ids, skip_special_tokens=True)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop" if token_ids and token_ids[-1] == tok.eos_token_id else "length",
            "logprobs": None,
        }
        if want_logprobs:
            choice["logprobs"] = {"content": [self._entry(i, lp, top) for i, lp in zip(token_ids, steps)]}
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {"completion_tokens": len(token_ids)},
        }

    def _entry(self, token_id: int, logprobs: torch.Tensor, top: int) -> dict:
        tok = self.judge.processor.tokenizer

        def item(i: int) -> dict:
            s = tok.decode([i])
            return {"token": s, "logprob": float(logprobs[i]), "bytes": list(s.encode("utf-8"))}

        entry = item(token_id)
        if top:
            entry["top_logprobs"] = [item(int(i)) for i in torch.topk(logprobs, top).indices]
        else:
            entry["top_logprobs"] = []
        return entry

    @torch.no_grad()
    def _generate(self, text: str, images: list[Image.Image], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        judge = self.judge
        with judge._lock:
            batch = judge.processor(text=[text], images=[images] if images else None, return_tensors="pt")
            batch = {k: v.to(judge.device) for k, v in batch.items()}
            out = judge.model.generate(
                **batch,
                max_new_tokens=max_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=judge.processor.tokenizer.pad_token_id,
            )
        new = out.sequences[0, batch["input_ids"].shape[1] :].tolist()
        steps = [torch.log_softmax(s[0].float(), dim=-1).cpu() for s in out.scores]
        return new, steps


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256  # many clients connect at once (the stdlib default of 5 drops connections)
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    server_ref: RewardServer
    protocol_version = "HTTP/1.1"
    server_version = "editr1-serve-reward"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

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
            return self._send(200, {"object": "list", "data": [{"id": self.server_ref.model_name, "object": "model"}]})
        if self.path.rstrip("/") == "/health":
            return self._send(200, {"status": "ok"})
        self._error(404, f"no route {self.path}", "not_found_error")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        try:
            if not self._authorised():
                return self._error(401, "missing or wrong bearer token", "authentication_error")
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self._error(404, f"no route {self.path}", "not_found_error")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._error(411, "Content-Length is required")
            if int(length) > self.server_ref.limits.max_request_bytes:
                return self._error(413, f"request of {length} bytes exceeds {self.server_ref.limits.max_request_bytes}")
            raw = self.rfile.read(int(length))
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return self._error(400, "request body is not valid JSON")
            self._send(200, self.server_ref.complete(body))
        except RequestError as exc:
            self._error(exc.status, str(exc), exc.kind)
        except Exception:
            log.exception("serve-reward: request failed")
            self._error(500, "internal error while judging", "server_error")


def serve_reward(
    model: str | None = None,
    revision: str | None = None,
    torch_dtype: str = "bfloat16",
    quantization: Quantization = "none",
    trust_remote_code: bool = False,
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    served_model_name: str | None = None,
    max_request_mb: float = 32.0,
    max_image_pixels: int = 16 * 1024 * 1024,
    max_batch: int = 8,
    local_files_only: bool = False,
    num_threads: int | None = None,
) -> None:
    """Serve a transformers MLLM judge over an OpenAI-compatible API.

    Args:
        model: hub id or folder of an image-text-to-text chat model; omit for the tiny judge (tests, demos).
        revision: hub revision.
        torch_dtype: bfloat16, float16 or float32.
        quantization: none, 8bit or 4bit (bitsandbytes).
        trust_remote_code: allow the model's own code from the hub.
        device: where the judge runs.
        host: interface to bind; 127.0.0.1 unless you mean to expose it.
        port: TCP port (0 picks a free one).
        api_key_env: environment variable holding the bearer token clients must send (none = open).
        served_model_name: the model name clients use (default: the model path).
        max_request_mb: largest request body accepted.
        max_image_pixels: largest decoded image accepted.
        max_batch: one-token requests batched per forward pass.
        local_files_only: never reach the network when loading.
        num_threads: CPU threads for torch (default: torch's choice).
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise SystemExit(f"serve-reward: environment variable {api_key_env} is empty or unset")
    judge = MLLMJudge(model, revision, torch_dtype, quantization, trust_remote_code, local_files_only=local_files_only)
    judge.load(device)
    limits = Limits(
        max_request_bytes=int(max_request_mb * 1024 * 1024), max_image_pixels=max_image_pixels, max_batch=max_batch
    )
    server = RewardServer(judge, host, port, api_key, served_model_name, limits)
    print(f"editr1 serve-reward: {server.model_name} at {server.url}", flush=True)
    server.serve_forever()

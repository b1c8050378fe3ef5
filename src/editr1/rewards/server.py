"""``editr1 serve-reward``: a small OpenAI-compatible server hosting a transformers MLLM judge.

For users without vLLM, and for the tests. It speaks the subset of the chat-completions protocol the
reward client uses — ``POST /v1/chat/completions`` with images as base64 ``data:`` URLs, greedy
decoding, ``logprobs`` / ``top_logprobs`` — plus ``GET /v1/models`` and ``GET /health``.

Why the standard library's ``http.server`` rather than FastAPI + uvicorn or LitServe (both install here):
what this server must get right is its own logic, which no framework does for it — isolating requests
inside a batched forward pass, prompt/image/token limits, deep JSON (starlette's ``request.json()``
raises ``RecursionError`` too), vLLM's error bodies — and uvicorn has no timeout on receiving a request
either, which a socket timeout gives here. So no new runtime dependency for a fallback server (vLLM is
the production path); every error is JSON, the standard library's own included.

Safe by default: binds 127.0.0.1, JSON only (never pickle), optional bearer token (from an environment
variable, compared in constant time), :class:`Limits` on bytes, prompt characters and tokens, images and
pixels, a socket timeout, no remote image URLs, errors as JSON without tracebacks. One-token requests are
batched into one forward pass; a failed batch is judged request by request so only the culprit fails.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from PIL import Image

from editr1.rewards.mllm import MLLMJudge, Quantization
from editr1.rewards.server_http import HTTPService, Limits, RequestError, _brief, decode_data_url

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``; anything else as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def processed(judge: MLLMJudge, texts: list[str], images: list | None, **kwargs) -> dict[str, torch.Tensor]:
    """The judge's processor batch on its device (call under ``judge._lock``: tokenizers are not thread-safe);
    a 400 :class:`RequestError` saying why when the processor refuses the input."""
    try:
        batch = judge.processor(text=texts, images=images, return_tensors="pt", **kwargs)
    except Exception as exc:
        raise RequestError(400, f"the judge's processor refused the request: {_brief(exc)}") from None
    return {k: v.to(judge.device) for k, v in batch.items()}


def parse_messages(messages, limits: Limits) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI chat messages → processor messages (``{"type": "image"}`` parts) and the images."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list")
    out, images, chars = [], [], 0
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, "each message needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise RequestError(400, "message content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                chars += len(part["text"])
                if chars > (cap := limits.max_prompt_chars):
                    raise RequestError(400, f"prompt of {chars} characters exceeds max_prompt_chars={cap}")
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
    future: Future


class Batcher:
    """Runs one-token requests that arrive together as one left-padded forward pass."""

    def __init__(self, judge: MLLMJudge, limits: Limits) -> None:
        self.judge = judge
        self.limits = limits
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="editr1-reward-batcher", daemon=True)
        self.thread.start()

    def submit(self, text: str, images: list[Image.Image]) -> Future:
        job = _Job(text, images, Future())
        self.jobs.put(job)
        return job.future

    def stop(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        while (batch := self._collect()) is not None:
            try:
                self._answer(batch)
            except Exception as exc:
                if len(batch) == 1:
                    self._fail(batch[0], exc)
                    continue
                # one request may have broken the pass (an image the processor refuses): only it should fail
                log.warning("a batch of %d failed (%s); judging its requests one by one", len(batch), _brief(exc))
                for job in batch:
                    try:
                        self._answer([job])
                    except Exception as lone:
                        self._fail(job, lone)

    def _collect(self) -> list[_Job] | None:
        """The next batch: the first waiting job and whatever arrives within ``batch_wait_s``; None: stop."""
        job = self.jobs.get()
        if job is None:
            return None
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
        return batch

    @torch.no_grad()
    def _answer(self, batch: list[_Job]) -> None:
        judge, texts, images = self.judge, [j.text for j in batch], [j.images for j in batch]
        if any(images):
            logits = judge.next_token_logits(texts, images)
        else:  # text only: the processor wants images=None
            with judge._lock:
                logits = judge.model(**processed(judge, texts, None, padding=True), logits_to_keep=1).logits[:, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for j, lp in zip(batch, logprobs):
            j.future.set_result(lp)

    def _fail(self, job: _Job, exc: Exception) -> None:
        """A request that failed alone: 400 if the processor refuses it (its fault), else the failure (a 500)."""
        try:
            with self.judge._lock:
                processed(self.judge, [job.text], [job.images] if job.images else None)
        except RequestError as refused:
            log.info("serve-reward: %s", refused)
            return job.future.set_exception(refused)
        log.error("judge forward pass failed", exc_info=exc)
        job.future.set_exception(exc)


class RewardServer(HTTPService):
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
        judge.load(judge.device)
        # prompt tokens are counted on a copy: a fast tokenizer used by two threads can fail "Already borrowed"
        try:
            self._tokenizer, self._tokenizer_lock = copy.deepcopy(judge.processor.tokenizer), threading.Lock()
        except Exception:  # a tokenizer that cannot be copied is shared, under the judge's lock
            self._tokenizer, self._tokenizer_lock = judge.processor.tokenizer, judge._lock
        self.batcher = Batcher(judge, self.limits)
        self.routes = {"/v1/chat/completions": self.complete}
        self.listen(host, port)

    def close(self) -> None:
        self.batcher.stop()

    def complete(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:  # vLLM's answer, word for word
            raise RequestError(404, f"The model `{model}` does not exist.", "NotFoundError")
        if body.get("stream") not in (None, False):
            raise RequestError(400, "stream: true is not supported by editr1 serve-reward; send stream: false")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if type(max_tokens) is not int or not 1 <= max_tokens <= self.limits.max_tokens:
            raise RequestError(400, f"max_tokens must be an integer in [1, {self.limits.max_tokens}]")
        if body.get("temperature", 0) not in (0, None):  # 0.0 == 0
            raise RequestError(400, "only greedy decoding is served: temperature must be 0")
        if body.get("n", 1) not in (1, None):
            raise RequestError(400, "n must be 1")
        want_logprobs = bool(body.get("logprobs", False))
        top = body.get("top_logprobs", 0) or 0
        if type(top) is not int or not 0 <= top <= self.limits.max_top_logprobs:
            raise RequestError(400, f"top_logprobs must be an integer in [0, {self.limits.max_top_logprobs}]")
        if top and not want_logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true")
        messages, images = parse_messages(body.get("messages"), self.limits)
        text = self.judge.chat_text(messages)
        with self._tokenizer_lock:
            n_tokens = len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tokens > (cap := self.limits.max_prompt_tokens):
            raise RequestError(400, f"prompt of {n_tokens} tokens exceeds max_prompt_tokens={cap}")
        if max_tokens == 1:
            logprobs = self.batcher.submit(text, images).result()
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

        top_items = [item(int(i)) for i in torch.topk(logprobs, top).indices] if top else []
        return dict(item(token_id), top_logprobs=top_items)

    @torch.no_grad()
    def _generate(self, text: str, images: list[Image.Image], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        judge = self.judge
        with judge._lock:
            batch = processed(judge, [text], [images] if images else None)
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


def serve_reward(
    model: str | None = None,
    revision: str | None = None,
    torch_dtype: str = "bfloat16",
    quantization: Quantization = "none",
    trust_remote_code: bool = False,
    device: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    served_model_name: str | None = None,
    max_request_mb: float = 32.0,
    max_image_pixels: int = 16 * 1024 * 1024,
    max_prompt_chars: int = 32_768,
    max_prompt_tokens: int = 8_192,
    max_batch: int = 8,
    socket_timeout_s: float = 60.0,
    local_files_only: bool = False,
    num_threads: int | None = None,
    reward: str | None = None,
    reward_args: dict | None = None,
    tiny_weights: str | None = None,
) -> None:
    """Serve a transformers MLLM judge over an OpenAI-compatible API, or (``--reward``) any Python reward.

    Args:
        model: hub id or folder of an image-text-to-text chat model; omit for the tiny judge (tests, demos).
        revision: hub revision.
        torch_dtype: bfloat16, float16 or float32.
        quantization: none, 8bit or 4bit (bitsandbytes).
        trust_remote_code: allow the model's own code from the hub.
        device: where the judge runs: auto (cuda when a GPU is present, else cpu), cpu, cuda, cuda:1, ...
        host: interface to bind; 127.0.0.1 unless you mean to expose it.
        port: TCP port (0 picks a free one).
        api_key_env: environment variable holding the bearer token clients must send (none = open).
        served_model_name: the model name clients use (default: the model path).
        max_request_mb: largest request body accepted.
        max_image_pixels: largest decoded image accepted.
        max_prompt_chars: most characters of text a request's messages may hold.
        max_prompt_tokens: most tokens of the chat text (an image placeholder counted once).
        max_batch: one-token requests batched per forward pass.
        socket_timeout_s: seconds a connection may stay silent (mid-request or idle) before it is closed.
        local_files_only: never reach the network when loading.
        num_threads: CPU threads for torch (default: torch's choice).
        reward: instead of a judge, serve this reward model (``package.module:Class``, any
            :class:`editr1.rewards.RewardModel`) on ``POST /v1/score`` (:mod:`editr1.rewards.scalar_server`);
            train against it with :class:`editr1.rewards.ServedScalarReward`.
        reward_args: the reward class's keyword arguments, e.g. ``'{"sigma": 1.0}'``.
        tiny_weights: without ``--model``: a trained tiny judge (its sizes from the file), e.g. the demo's
            ``asset:demo_judge/model.safetensors``; omit both for the untrained tiny judge.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    api_key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        raise SystemExit(f"editr1 serve-reward: error: environment variable {api_key_env} is empty or unset")
    limits = Limits(
        max_request_bytes=int(max_request_mb * 1024 * 1024),
        max_image_pixels=max_image_pixels,
        max_prompt_chars=max_prompt_chars,
        max_prompt_tokens=max_prompt_tokens,
        max_batch=max_batch,
        socket_timeout_s=socket_timeout_s,
    )
    if reward is not None:
        from editr1.rewards.scalar_server import ScalarRewardServer, load_reward

        if model is not None:
            raise SystemExit(
                "editr1 serve-reward: error: give --model (a judge) or --reward (a reward class), not both"
            )
        try:
            served = load_reward(reward, reward_args).to(resolve_device(device))
        except ValueError as exc:
            raise SystemExit(f"editr1 serve-reward: error: {exc}") from None
        server = ScalarRewardServer(served, host, port, api_key, served_model_name, limits)
        print(f"editr1 serve-reward: {server.model_name} at {server.url}/score", flush=True)
        return server.serve_forever()
    tiny = None
    if tiny_weights is not None:
        from editr1.rewards.tiny_judge import tiny_judge_from_file

        if model is not None:
            raise SystemExit("editr1 serve-reward: error: give --model or --tiny_weights, not both")
        try:
            tiny = tiny_judge_from_file(tiny_weights)
        except (ValueError, OSError) as exc:
            raise SystemExit(f"editr1 serve-reward: error: {exc}") from None
    judge = MLLMJudge(
        model, revision, torch_dtype, quantization, trust_remote_code, tiny=tiny, local_files_only=local_files_only
    )
    judge.load(resolve_device(device))
    server = RewardServer(judge, host, port, api_key, served_model_name, limits)
    print(f"editr1 serve-reward: {server.model_name} at {server.url}", flush=True)
    server.serve_forever()

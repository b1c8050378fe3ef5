"""Judges for benchmark evaluation: a multimodal LLM that *writes* an answer (rubric scores, a
VIEScore JSON), unlike the training reward, which reads first-token logits.

Two kinds, one interface (:class:`TextJudge`):

* :class:`LocalJudge` — a transformers image-text-to-text chat model in this process (greedy decoding,
  i.e. temperature 0); ``None`` as the path builds the tiny Qwen2.5-VL of the tests.
* :class:`ServedJudge` — any OpenAI-compatible chat-completions endpoint (vLLM, a hosted API), through
  :class:`editr1.rewards.http.OpenAIClient`, ``temperature: 0``, several requests in flight, transport
  failures retried with backoff.

A judge returns the answer text, or ``None`` when it could not get one (the caller counts it as
failed — never as a score). Parsing and parse retries belong to the protocol
(:func:`ask_parsed`). ``info()`` says which model and version judged, for the summary.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from editr1.images import data_url, limit_pixels
from editr1.rewards.http import OpenAIClient
from editr1.rewards.mllm import MLLMJudge, Quantization
from editr1.rewards.tiny_judge import TinyJudge

log = logging.getLogger(__name__)


class JudgeConfigError(RuntimeError):
    """The judge refused a request for a reason retrying cannot fix (bad model name, bad key, …)."""


@dataclass
class JudgeRequest:
    """One judgement: images and a text, in one user turn (text first when ``text_first``)."""

    images: list[Image.Image]
    text: str
    text_first: bool = False


@dataclass
class Judged:
    """What :func:`ask_parsed` returns for one request: the parsed value (``None`` = failed), every raw
    answer received, the number of attempts and, when it failed, why (``transport`` or ``parse``)."""

    value: Any
    answers: list[str | None] = field(default_factory=list)
    attempts: int = 0
    failure: str | None = None


class TextJudge(ABC):
    """Answers judge requests with text (``None`` where no answer could be had)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    @abstractmethod
    def generate(self, requests: Sequence[JudgeRequest]) -> list[str | None]: ...

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """Model name, revision/version and decoding settings, recorded with the scores."""

    def to(self, device: torch.device | str) -> TextJudge:  # noqa: D401 - torch-like
        return self

    def close(self) -> None:
        pass


def ask_parsed(
    judge: TextJudge,
    requests: Sequence[JudgeRequest],
    parse: Callable[[str], Any] | Sequence[Callable[[str], Any]],
    max_attempts: int = 3,
) -> list[Judged]:
    """Ask every request; ask again (up to ``max_attempts`` in all) only those whose answer is missing
    or does not parse. ``parse`` (one for all, or one per request) returns ``None`` for an answer it
    rejects."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    parsers = list(parse) if isinstance(parse, Sequence) else [parse] * len(requests)
    if len(parsers) != len(requests):
        raise ValueError(f"{len(parsers)} parsers for {len(requests)} requests")
    results = [Judged(None) for _ in requests]
    pending = list(range(len(requests)))
    for _ in range(max_attempts):
        if not pending:
            break
        answers = judge.generate([requests[i] for i in pending])
        still = []
        for i, answer in zip(pending, answers):
            r = results[i]
            r.attempts += 1
            r.answers.append(answer)
            value = parsers[i](answer) if answer is not None else None
            if value is None:
                r.failure = "transport" if answer is None else "parse"
                still.append(i)
            else:
                r.value, r.failure = value, None
        pending = still
    return results


# ---------------------------------------------------------------------------------------------- local
class LocalJudge(TextJudge):
    """A transformers chat MLLM in this process, greedy decoding.

    Args:
        pretrained_model_name_or_path: hub id or folder (e.g. ``Qwen/Qwen2.5-VL-72B-Instruct``); ``None``
            builds the tiny judge in code (tests: its answers are not meant to parse).
        revision: hub revision.
        torch_dtype: ``bfloat16``, ``float16`` or ``float32``.
        quantization: ``none``, ``8bit`` or ``4bit`` (bitsandbytes).
        trust_remote_code: allow a model's own code from the hub; off unless you trust it.
        max_new_tokens: answer length limit.
        batch_size: requests per generate call (left-padded).
        max_pixels: downscale each image to at most this many pixels.
        tiny: sizes of the tiny judge when no path is given.
        local_files_only: never reach the network when loading.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        revision: str | None = None,
        torch_dtype: str = "bfloat16",
        quantization: Quantization = "none",
        trust_remote_code: bool = False,
        max_new_tokens: int = 256,
        batch_size: int = 4,
        max_pixels: int | None = 1024 * 1024,
        tiny: TinyJudge | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__()
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("local judge: need max_new_tokens >= 1 and batch_size >= 1")
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.model = MLLMJudge(
            pretrained_model_name_or_path,
            revision,
            torch_dtype,
            quantization,
            trust_remote_code,
            tiny,
            local_files_only,
        )

    def to(self, device: torch.device | str) -> LocalJudge:
        self.model.load(device)
        return self

    def info(self) -> dict[str, Any]:
        m = self.model
        commit = None
        if m.model is not None:
            commit = getattr(m.model.config, "_commit_hash", None)
        return {
            "kind": "local",
            "model": m.name,
            "revision": m.revision,
            "commit": commit,
            "dtype": str(m.dtype).replace("torch.", ""),
            "quantization": m.quantization,
            "decoding": "greedy (temperature 0)",
            "max_new_tokens": self.max_new_tokens,
        }

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str | None]:
        m = self.model
        out: list[str | None] = []
        for s in range(0, len(requests), self.batch_size):
            chunk = requests[s : s + self.batch_size]
            texts, images = [], []
            for r in chunk:
                parts = [{"type": "image"}] * len(r.images)
                text = [{"type": "text", "text": r.text}]
                texts.append(m.chat_text([{"role": "user", "content": text + parts if r.text_first else parts + text}]))
                images.append([limit_pixels(im, self.max_pixels) for im in r.images])
            out.extend(m.generate(texts, images, self.max_new_tokens))
            self.counts["requests"] += len(chunk)
        return out


# ---------------------------------------------------------------------------------------------- served
class ServedJudge(TextJudge):
    """A judge behind an OpenAI-compatible chat-completions endpoint (vLLM, a hosted API).

    Args:
        base_url: API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server knows the judge by (recorded with the scores, with the
            ``model`` and ``system_fingerprint`` the server reports).
        api_key_env: environment variable holding the API key (unset: no key is sent).
        max_tokens: answer length limit.
        seed: sent with each request where the server honours it (``None``: not sent).
        max_concurrency: requests in flight.
        timeout: seconds per request.
        max_retries: transport retries (connection errors, timeouts, HTTP 408/409/429/5xx) before the
            request counts as failed.
        retry_backoff: first retry delay in seconds, doubling.
        max_pixels: downscale images to at most this many pixels before sending.
        image_format: ``png`` (lossless, default) or ``jpeg``.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "Qwen/Qwen2.5-VL-72B-Instruct",
        api_key_env: str | None = "EDITR1_JUDGE_API_KEY",
        max_tokens: int = 512,
        seed: int | None = 0,
        max_concurrency: int = 16,
        timeout: float = 180.0,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        max_pixels: int | None = 1024 * 1024,
        image_format: str = "png",
    ) -> None:
        super().__init__()
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0 or max_tokens < 1:
            raise ValueError("served judge: need max_concurrency >= 1, max_retries >= 0, timeout > 0, max_tokens >= 1")
        image_format = image_format.lower()
        if image_format not in ("png", "jpeg", "jpg"):
            raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.max_tokens = max_tokens
        self.seed = seed
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_pixels = max_pixels
        self.image_format = image_format
        self.reported: Counter = Counter()  # (model, system_fingerprint) the server answered with
        self._client: OpenAIClient | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_client=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _get_client(self) -> OpenAIClient:
        with self._lock:
            if self._client is None:  # made on first use (the key is read then)
                self._client = OpenAIClient(
                    self.base_url,
                    self.api_key_env,
                    self.timeout,
                    self.max_retries,
                    self.retry_backoff,
                    self.max_concurrency,
                    counts=self.counts,
                    lock=self._lock,
                    refused=JudgeConfigError,
                    label="judge",
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def info(self) -> dict[str, Any]:
        served = [
            {"model": m, "system_fingerprint": f, "answers": n} for (m, f), n in sorted(self.reported.items(), key=str)
        ]
        return {
            "kind": "served",
            "model": self.model,
            "base_url": self.base_url,
            "served_as": served,
            "temperature": 0.0,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
        }

    def payload(self, request: JudgeRequest) -> dict:
        images = [
            {"type": "image_url", "image_url": {"url": data_url(limit_pixels(im, self.max_pixels), self.image_format)}}
            for im in request.images
        ]
        text = [{"type": "text", "text": request.text}]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text + images if request.text_first else images + text}],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str | None]:
        if not requests:
            return []
        client = self._get_client()
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self._one(client, r), requests))

    def _one(self, client: OpenAIClient, request: JudgeRequest) -> str | None:
        return client.post("chat/completions", self.payload(request), self._answer)  # None: failed, counted

    def _answer(self, data: Any) -> str:
        """The answer text of a chat-completion body (and a note of who answered); raises for a malformed one."""
        text = data["choices"][0]["message"]["content"]
        if not isinstance(text, str):
            raise TypeError
        with self._lock:
            self.reported[(str(data.get("model")), str(data.get("system_fingerprint")))] += 1
        return text

"""A reward model behind an HTTP server that returns one number per (source, edit, instruction): the shape of
EditReward / EditScore / UnifiedReward deployments and of ``editr1 serve-reward --reward`` (its protocol is in
:mod:`editr1.rewards.scalar_server`).

The same rules as the served judge (:mod:`editr1.rewards.served`): requests on background threads with bounded
concurrency (``submit`` returns at once), transport failures and malformed answers retried with backoff then NaN
and counted by reason, configuration errors (HTTP 400/401/403/404) stop the run with the server's message, the API
key from an environment variable. A score is mapped from ``score_range`` to [0, 1]; a well-formed score outside it
is NaN (``failed/out_of_range``) unless ``out_of_range: clamp`` (counted as ``clamped``); ``"score": null`` is the
server saying it could not judge (``failed/not_judged``). Edit masks (``RewardInputs.masks``) are not part of the
protocol and are not sent: a mask-aware reward served this way sees none and measures the whole image.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import torch

from editr1.images import data_url, limit_pixels, tensor_to_image
from editr1.rewards.base import RewardInputs, RewardModel
from editr1.rewards.http import OpenAIClient
from editr1.rewards.served import RewardServerError


def read_score(body: Any, key: str = "score") -> float:
    """The number under ``key`` in a JSON object (NaN for ``null``); ValueError for anything else."""
    if not isinstance(body, dict) or key not in body:
        raise ValueError(f"the answer has no {key!r}")
    v = body[key]
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{key!r} is {v!r}, not a finite number")
    return float(v)


def to_unit(v: float, low: float, high: float) -> float:
    """``v`` mapped linearly from [low, high] to [0, 1] (NaN stays NaN; no clamping)."""
    return (v - low) / (high - low)


class ServedScalarReward(RewardModel):
    """Scores each edit with one request to a scalar reward server.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1``.
        path: the route under it that scores one edit.
        model: sent as ``"model"`` when given (servers hosting several rewards).
        api_key_env: environment variable holding the bearer token (unset or ``None``: none sent).
        score_key: where the number is in the answer.
        score_range: ``[low, high]`` of the server's scores, mapped to [0, 1].
        out_of_range: a score outside ``score_range``: ``fail`` (NaN, counted) or ``clamp`` (counted).
        send_target: also send the row's known target image (rewards that compare against it).
        max_pixels: downscale images to at most this many pixels before sending.
        image_format: ``png`` or ``jpeg``.
        max_concurrency, timeout, max_retries, retry_backoff: as for the served judge.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        path: str = "score",
        model: str | None = None,
        api_key_env: str | None = "EDITR1_REWARD_API_KEY",
        score_key: str = "score",
        score_range: tuple[float, float] = (0.0, 1.0),
        out_of_range: Literal["fail", "clamp"] = "fail",
        send_target: bool = False,
        max_pixels: int | None = None,
        image_format: str = "png",
        max_concurrency: int = 16,
        timeout: float = 60.0,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
    ) -> None:
        low, high = (float(x) for x in score_range)
        if not high > low or out_of_range not in ("fail", "clamp"):
            raise ValueError(
                f"score_range needs high > low and out_of_range fail|clamp, got {score_range}, {out_of_range!r}"
            )
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("served scalar reward: need max_concurrency >= 1, max_retries >= 0, timeout > 0")
        self.base_url, self.path, self.model, self.api_key_env = base_url, path, model, api_key_env
        self.score_key, self.low, self.high, self.out_of_range = score_key, low, high, out_of_range
        self.send_target, self.max_pixels, self.image_format = send_target, max_pixels, image_format
        self.max_concurrency, self.timeout, self.max_retries, self.retry_backoff = (
            max_concurrency,
            timeout,
            max_retries,
            retry_backoff,
        )
        self.needs_targets = send_target
        self.counts: Counter = Counter()
        self._client: OpenAIClient | None = None
        self._pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        self._lock, self._count_lock = threading.Lock(), threading.Lock()

    def _started(self) -> tuple[OpenAIClient, ThreadPoolExecutor, ThreadPoolExecutor]:
        with self._lock:
            if self._client is None:
                self._client = OpenAIClient(
                    self.base_url,
                    self.api_key_env,
                    self.timeout,
                    self.max_retries,
                    self.retry_backoff,
                    self.max_concurrency,
                    counts=self.counts,
                    lock=self._count_lock,
                    refused=RewardServerError,
                    label="reward server",
                )
                n = self.max_concurrency
                self._pools = (ThreadPoolExecutor(n, "editr1-scalar-chunk"), ThreadPoolExecutor(n, "editr1-scalar"))
            return self._client, *self._pools

    def close(self) -> None:
        with self._lock:
            client, pools, self._client, self._pools = self._client, self._pools, None, None
        for pool in pools or ():
            pool.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            client.close()

    def __getstate__(self) -> dict:  # threads and clients do not travel to other processes
        return {**self.__dict__, "_client": None, "_pools": None, "_lock": None, "_count_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._count_lock = threading.Lock(), threading.Lock()

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        return self.submit(inputs).result()

    def submit(self, inputs: RewardInputs) -> Future:
        client, chunks, requests = self._started()
        return chunks.submit(self._score, client, requests, inputs)

    def stats(self) -> dict[str, float]:
        with self._count_lock:
            return {k: float(v) for k, v in self.counts.items()}

    def _url(self, image: torch.Tensor) -> str:
        return data_url(limit_pixels(tensor_to_image(image), self.max_pixels), self.image_format)

    def _score(self, client: OpenAIClient, requests: ThreadPoolExecutor, inputs: RewardInputs) -> torch.Tensor:
        if self.send_target and inputs.targets is None:
            raise ValueError("ServedScalarReward(send_target=True) needs rows with a target image")
        sources: dict[int, str] = {}
        bodies = []
        for i in range(inputs.edits.shape[0]):
            sid = inputs.source_ids[i] if inputs.source_ids is not None else -1 - i
            if sid not in sources:
                sources[sid] = self._url(inputs.sources[i])
            body = {"source": sources[sid], "edit": self._url(inputs.edits[i])}
            body.update(instruction=inputs.instructions[i], requirement=inputs.requirements[i])
            if self.model is not None:
                body["model"] = self.model
            if self.send_target:
                body["target"] = self._url(inputs.targets[i])
            bodies.append(body)
        futures = [requests.submit(self._judge, client, body) for body in bodies]
        return torch.tensor([f.result() for f in futures], dtype=torch.float32)

    def _judge(self, client: OpenAIClient, body: dict) -> float:
        raw = client.post(self.path, body, lambda answer: read_score(answer, self.score_key))
        if raw is None:  # failed after retries, counted by reason
            return math.nan
        if math.isnan(raw):
            self._count("failed/not_judged")
            return math.nan
        v = to_unit(raw, self.low, self.high)
        if 0.0 <= v <= 1.0:
            return v
        if self.out_of_range == "clamp":
            self._count("clamped")
            return min(max(v, 0.0), 1.0)
        self._count("failed/out_of_range")
        return math.nan

    def _count(self, key: str) -> None:
        with self._count_lock:
            self.counts[key] += 1

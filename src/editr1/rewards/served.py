"""The MLLM reward from a server speaking the OpenAI chat-completions protocol (vLLM, ``editr1
serve-reward``, a hosted API): ``max_tokens: 1``, ``logprobs`` + ``top_logprobs: 20``, and the score
from the digit probabilities renormalised over the digits present.

HTTP goes through :class:`editr1.rewards.http.OpenAIClient` (``httpx``, pooled connections). Requests run
on background threads with bounded concurrency, so ``submit`` returns at once and scoring one rollout
chunk overlaps generating the next. Transport failures (connection refused, timeouts, HTTP 408/409/429/
5xx, a malformed body) are retried with exponential backoff a bounded number of times; a sample that
still fails is NaN and counted by reason — never a silent 0. An answer that is not a valid log-probability
list (a token that is not a string, a logprob that is not a number or is above 0, probabilities summing past 1)
is malformed like a body that is not JSON. Configuration errors (HTTP 400/401/403/404) stop the run with
the server's message.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from editr1.images import data_url
from editr1.rewards.base import RewardInputs, RewardModel
from editr1.rewards.http import OpenAIClient, error_message, retryable
from editr1.rewards.mllm import judge_images, reference_counts
from editr1.rewards.prompts import load_template, render
from editr1.rewards.scoring import DigitTokens, MissingDigits, checked_pair, score_top_logprobs

log = logging.getLogger(__name__)

__all__ = ["RewardServerError", "ServedMLLMReward", "data_url", "error_message", "retryable", "top_logprobs_of"]


class RewardServerError(RuntimeError):
    """The reward server refused the request for a reason retrying cannot fix."""


def top_logprobs_of(response: Any) -> list[tuple[str, float]]:
    """``(token, logprob)`` pairs of the first answer token of a chat-completion JSON body, each checked
    (a string token, a log-probability <= 0: :func:`~editr1.rewards.scoring.checked_pair`); raises
    ValueError when the body carries none or carries a malformed one."""
    try:
        first = response["choices"][0]["logprobs"]["content"][0]
        entries = first.get("top_logprobs") or []
        if not isinstance(entries, list):
            raise TypeError("top_logprobs is not a list")
        pairs = dict(checked_pair(t["token"], t["logprob"]) for t in entries)
        token, logprob = checked_pair(first["token"], first["logprob"])
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"no_logprobs: {type(exc).__name__}: {exc}") from None
    pairs.setdefault(token, logprob)  # the chosen token, if the list left it out
    return list(pairs.items())


class ServedMLLMReward(RewardModel):
    """An MLLM judge behind an OpenAI-compatible endpoint. It is shown the source, the references and the edit;
    edit masks (``RewardInputs.masks``) are not sent.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1`` (``vllm serve`` or
            ``editr1 serve-reward``).
        model: the model name the server knows the judge by.
        api_key_env: environment variable that holds the API key (unset: no key is sent).
        prompt: judge prompt template with ``{instruction}`` and ``{requirement}``; ``None`` = ours.
        prompt_file: read the template from a file instead.
        max_concurrency: requests in flight at once.
        timeout: seconds per request.
        max_retries: retries of a request that failed in transport (then the sample is NaN).
        retry_backoff: first retry delay in seconds; doubles each retry.
        top_logprobs: log-probabilities asked for the first token (vLLM allows up to 20).
        max_pixels: downscale images to at most this many pixels before sending.
        image_format: ``png`` (lossless, default) or ``jpeg`` (PIL's default quality 75, as the reference
            code sends them).
        digit_tokens: ``pooled`` counts " 3" with "3" (tokenizers that give a digit a leading-space
            variant); ``plain`` reads only the six tokens "0"…"5", as the reference code does.
        missing_digits: a digit absent from the returned top-k: ``renormalize`` over the digits present,
            or ``fail`` (the judgement is NaN, counted as ``failed/missing_digits``). Either way the
            digits' total probability is logged per step (``reward_model/digit_mass_mean`` and ``_min``).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "Qwen/Qwen2.5-VL-32B-Instruct",
        api_key_env: str | None = "EDITR1_REWARD_API_KEY",
        prompt: str | None = None,
        prompt_file: str | None = None,
        max_concurrency: int = 32,
        timeout: float = 120.0,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        top_logprobs: int = 20,
        max_pixels: int | None = None,
        image_format: str = "png",
        digit_tokens: DigitTokens = "pooled",
        missing_digits: MissingDigits = "renormalize",
    ) -> None:
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0 or not 1 <= top_logprobs <= 20:
            raise ValueError(
                "served reward: need max_concurrency >= 1, max_retries >= 0, timeout > 0, 1 <= top_logprobs <= 20"
            )
        if image_format.lower() not in ("png", "jpeg", "jpg"):
            raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.template = load_template(prompt, prompt_file)
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.top_logprobs = top_logprobs
        self.max_pixels = max_pixels
        self.image_format = image_format
        if digit_tokens not in ("pooled", "plain") or missing_digits not in ("renormalize", "fail"):
            raise ValueError(
                f"digit_tokens must be pooled|plain and missing_digits renormalize|fail, got "
                f"{digit_tokens!r}, {missing_digits!r}"
            )
        self.digit_tokens = digit_tokens
        self.missing_digits = missing_digits
        self.digit_masses: list[float] = []  # since the last step_stats()
        self.counts: Counter = Counter()
        self._client: OpenAIClient | None = None
        self._chunks: ThreadPoolExecutor | None = None  # one task per submitted chunk: encode, fan out, gather
        self._requests: ThreadPoolExecutor | None = None  # one task per judgement (its request and retries)
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------------------------- lifecycle
    def _pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        with self._lock:
            if self._chunks is None or self._requests is None:
                n = self.max_concurrency
                self._chunks = ThreadPoolExecutor(n, thread_name_prefix="editr1-served-reward-chunk")
                self._requests = ThreadPoolExecutor(n, thread_name_prefix="editr1-served-reward")
            return self._chunks, self._requests

    def _get_client(self) -> OpenAIClient:
        with self._lock:
            if self._client is None:  # made on first use, on a worker thread (the key is read then)
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
            return self._client

    def close(self) -> None:
        with self._lock:
            client, chunks, requests = self._client, self._chunks, self._requests
            self._client = self._chunks = self._requests = None
        for pool in (chunks, requests):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            client.close()

    def __getstate__(self) -> dict:  # threads and clients do not travel to other processes
        state = dict(self.__dict__)
        state.update(_client=None, _chunks=None, _requests=None, _lock=None, _count_lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------------------------- scoring
    def score(self, inputs: RewardInputs) -> torch.Tensor:
        return self.submit(inputs).result()

    def submit(self, inputs: RewardInputs) -> Future:
        chunks, requests = self._pools()
        return chunks.submit(self._score, inputs, requests)

    def stats(self) -> dict[str, float]:
        with self._count_lock:
            return {k: float(v) for k, v in self.counts.items()}

    def step_stats(self) -> dict[str, float]:
        """Digit probability mass of the judgements answered since the last call (mean and min)."""
        with self._count_lock:
            masses, self.digit_masses = self.digit_masses, []
        if not masses:
            return {}
        return {"digit_mass_mean": sum(masses) / len(masses), "digit_mass_min": min(masses)}

    def _count(self, key: str) -> None:
        with self._count_lock:
            self.counts[key] += 1

    def _score(self, inputs: RewardInputs, requests: ThreadPoolExecutor) -> torch.Tensor:
        client = self._get_client()
        urls = self._encode(inputs)
        counts = reference_counts(inputs)
        texts = [render(self.template, i, r, k) for i, r, k in zip(inputs.instructions, inputs.requirements, counts)]
        futures = [requests.submit(self._judge, client, images, text) for images, text in zip(urls, texts)]
        return torch.tensor([f.result() for f in futures], dtype=torch.float32)

    def _encode(self, inputs: RewardInputs) -> list[list[str]]:
        """Data URLs of [source, *references, edit]; each distinct source (and its references) is encoded once."""
        cache: dict[int, list[str]] = {}
        out = []
        for i, images in enumerate(judge_images(inputs, self.max_pixels)):
            sid = inputs.source_ids[i] if inputs.source_ids is not None else id(images[0])
            if sid not in cache:
                cache[sid] = [data_url(im, self.image_format) for im in images[:-1]]
            out.append([*cache[sid], data_url(images[-1], self.image_format)])
        return out

    def _judge(self, client: OpenAIClient, image_urls: list[str], text: str) -> float:
        content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        # Reading and scoring the answer is the parse step: a malformed one (a token that is not a string, a
        # logprob above 0, probabilities summing past 1, ...) raises ValueError there, so it is retried and
        # then counted as failed/malformed_response; None: failed, counted by reason.
        scored = client.post("chat/completions", payload, self._read)
        if scored is None:
            return float("nan")
        value, mass = scored
        with self._count_lock:
            self.digit_masses.append(mass)
        if value != value:  # NaN: a well-formed answer; retrying will not help
            self._count("failed/no_digits" if mass == 0 else "failed/missing_digits")
        return value

    def _read(self, response: Any) -> tuple[float, float]:
        """(score, digit mass) of one chat-completion body; ValueError when it is malformed."""
        return score_top_logprobs(top_logprobs_of(response), self.digit_tokens, self.missing_digits)

"""The MLLM reward from a server speaking the OpenAI chat-completions protocol (vLLM, ``editr1
serve-reward``, a hosted API): ``max_tokens: 1``, ``logprobs`` + ``top_logprobs: 20``, and the score
from the digit probabilities renormalised over the digits present.

HTTP goes through ``httpx`` (an async client, pooled connections). Requests run on a background event
loop with bounded concurrency, so ``submit`` returns at once and
scoring one rollout chunk overlaps generating the next. Transport failures (connection refused,
timeouts, HTTP 429/5xx, a malformed body) are retried with exponential backoff a bounded number of
times; a sample that still fails is NaN and counted by reason — never a silent 0. Configuration
errors (HTTP 400/401/403/404) stop the run with the server's message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import threading
from collections import Counter
from concurrent.futures import Future
from typing import Any

import torch
from PIL import Image

from editr1.rewards.base import RewardInputs, RewardModel
from editr1.rewards.mllm import judge_images
from editr1.rewards.prompts import load_template, render
from editr1.rewards.scoring import DigitTokens, MissingDigits, score_top_logprobs

log = logging.getLogger(__name__)


class RewardServerError(RuntimeError):
    """The reward server refused the request for a reason retrying cannot fix."""


def data_url(img: Image.Image, fmt: str = "png") -> str:
    buf = io.BytesIO()
    mime = "jpeg" if fmt.lower() in ("jpg", "jpeg") else fmt.lower()
    img.save(buf, format=mime.upper())
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def top_logprobs_of(response: Any) -> list[tuple[str, float]]:
    """``(token, logprob)`` pairs of the first answer token of a chat-completion JSON body; raises
    ValueError when it carries none."""
    try:
        first = response["choices"][0]["logprobs"]["content"][0]
        pairs = {t["token"]: float(t["logprob"]) for t in (first.get("top_logprobs") or [])}
        pairs.setdefault(first["token"], float(first["logprob"]))  # the chosen token, if the list left it out
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise ValueError("no_logprobs") from None
    return list(pairs.items())


def retryable(status: int) -> bool:
    """HTTP statuses worth retrying (timeout, conflict, rate limit, server error); other non-200s are
    configuration errors that retrying cannot fix."""
    return status in (408, 409, 429) or status >= 500


def error_message(response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except Exception:
        return response.text[:200]


class ServedMLLMReward(RewardModel):
    """An MLLM judge behind an OpenAI-compatible endpoint.

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
            raise ValueError("served reward: need max_concurrency >= 1, max_retries >= 0, timeout > 0, 1 <= top_logprobs <= 20")
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
            raise ValueError(f"digit_tokens must be pooled|plain and missing_digits renormalize|fail, got "
                             f"{digit_tokens!r}, {missing_digits!r}")
        self.digit_tokens = digit_tokens
        self.missing_digits = missing_digits
        self.digit_masses: list[float] = []  # since the last step_stats()
        self.counts: Counter = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None
        self._semaphore: asyncio.Semaphore | None = None
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------------------------- lifecycle
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="editr1-served-reward", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _get_client(self):
        if self._client is None:
            import httpx

            key = os.environ.get(self.api_key_env) if self.api_key_env else None
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(
                base_url=self.base_url.rstrip("/") + "/", headers=headers, timeout=self.timeout, limits=limits
            )
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        return self._client

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), loop).result(timeout=10)
            self._client = None
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()

    def __getstate__(self) -> dict:  # loops and clients do not travel to other processes
        state = dict(self.__dict__)
        state.update(_loop=None, _thread=None, _client=None, _semaphore=None, _lock=None, _count_lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------------------------- scoring
    def score(self, inputs: RewardInputs) -> torch.Tensor:
        return self.submit(inputs).result()

    def submit(self, inputs: RewardInputs) -> Future:
        loop = self._ensure_loop()
        return asyncio.run_coroutine_threadsafe(self._score(inputs), loop)

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

    async def _score(self, inputs: RewardInputs) -> torch.Tensor:
        self._get_client()
        loop = asyncio.get_running_loop()
        urls = await loop.run_in_executor(None, self._encode, inputs)
        texts = [render(self.template, i, r) for i, r in zip(inputs.instructions, inputs.requirements)]
        results = await asyncio.gather(*(self._judge(src, edit, text) for (src, edit), text in zip(urls, texts)))
        return torch.tensor(results, dtype=torch.float32)

    def _encode(self, inputs: RewardInputs) -> list[tuple[str, str]]:
        """Data URLs of (source, edit); each distinct source is encoded once."""
        cache: dict[int, str] = {}
        out = []
        for i, (src, edit) in enumerate(judge_images(inputs, self.max_pixels)):
            sid = inputs.source_ids[i] if inputs.source_ids is not None else id(src)
            if sid not in cache:
                cache[sid] = data_url(src, self.image_format)
            out.append((cache[sid], data_url(edit, self.image_format)))
        return out

    async def _judge(self, source_url: str, edit_url: str, text: str) -> float:
        import httpx

        payload = {
            "model": self.model,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": source_url}},
                    {"type": "image_url", "image_url": {"url": edit_url}},
                    {"type": "text", "text": text},
                ],
            }],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        assert self._semaphore is not None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                await asyncio.sleep(self.retry_backoff * 2 ** (attempt - 1))
            self._count("requests")
            try:
                async with self._semaphore:
                    response = await self._client.post("chat/completions", json=payload)
            except httpx.TimeoutException:
                reason = "timeout"
            except httpx.TransportError:
                reason = "connection"
            else:
                status = response.status_code
                if retryable(status):
                    reason = f"http_{status}"
                elif status != 200:
                    raise RewardServerError(
                        f"reward server {self.base_url} refused the request (HTTP {status}): {error_message(response)}"
                    )
                else:
                    try:
                        top = top_logprobs_of(response.json())
                    except ValueError:  # includes a body that is not JSON
                        reason = "malformed_response"
                    else:
                        value, mass = score_top_logprobs(top, self.digit_tokens, self.missing_digits)
                        with self._count_lock:
                            self.digit_masses.append(mass)
                        if value != value:  # NaN: a well-formed answer; retrying will not help
                            self._count("failed/no_digits" if mass == 0 else "failed/missing_digits")
                        return value
            self._count(f"errors/{reason}")
        self._count(f"failed/{reason}")
        return float("nan")

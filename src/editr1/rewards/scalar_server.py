"""Serving any Python reward (``editr1 serve-reward --reward package.module:Class``) over HTTP, with the judge
server's safe defaults (:mod:`editr1.rewards.server_http`: loopback, JSON only, limits, bearer token, timeouts).

One route, ``POST /v1/score``, the shape of reward-model deployments such as EditReward / EditScore /
UnifiedReward servers, and what :class:`editr1.rewards.served_scalar.ServedScalarReward` sends::

    {"source": "data:image/png;base64,...", "edit": "data:...", "instruction": "...",
     "requirement": "..." (optional), "target": "data:..." (optional), "model": "<name>" (optional)}
    → {"score": 0.73, "model": "<name>"}     ("score": null when the reward could not judge the edit)

Plus ``GET /v1/models`` and ``GET /health``. Requests are scored one at a time (a reward need not be thread-safe).
"""

from __future__ import annotations

import importlib
import logging
import math
import threading

import torch

from editr1.images import image_to_tensor
from editr1.rewards.base import RewardInputs, RewardModel
from editr1.rewards.server_http import HTTPService, Limits, RequestError, decode_data_url

log = logging.getLogger("editr1.rewards.server")


def load_reward(spec: str, kwargs: dict | None = None) -> RewardModel:
    """``package.module:Class`` (or ``package.module.Class``) built with ``kwargs``; must be a RewardModel."""
    module_name, sep, name = spec.partition(":")
    if not sep:
        module_name, _, name = spec.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"--reward {spec!r}: give package.module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--reward {spec!r}: {exc}") from None
    reward = cls(**(kwargs or {}))
    if not isinstance(reward, RewardModel):
        raise ValueError(f"--reward {spec!r} is a {type(reward).__name__}, not an editr1.rewards.RewardModel")
    return reward


class ScalarRewardServer(HTTPService):
    """Serves ``reward`` on ``POST /v1/score``. ``start()`` serves in a background thread; ``serve_forever()``
    blocks."""

    def __init__(
        self,
        reward: RewardModel,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        model_name: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.reward, self.limits, self.api_key = reward, limits or Limits(), api_key
        self.model_name = model_name or type(reward).__name__
        self._lock = threading.Lock()
        self.routes = {"/v1/score": self.score}
        self.listen(host, port)

    def close(self) -> None:
        self.reward.close()

    def _image(self, body: dict, key: str, required: bool = True) -> torch.Tensor | None:
        url = body.get(key)
        if url is None and not required:
            return None
        if not isinstance(url, str):
            raise RequestError(400, f"{key} must be an image as a data: URL")
        return image_to_tensor(decode_data_url(url, self.limits))[None]

    def score(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(404, f"The model `{model}` does not exist.", "NotFoundError")
        instruction, requirement = body.get("instruction"), body.get("requirement", "")
        if not isinstance(instruction, str) or not isinstance(requirement, str):
            raise RequestError(400, "instruction (and requirement, if given) must be strings")
        if len(instruction) + len(requirement) > (cap := self.limits.max_prompt_chars):
            raise RequestError(400, f"instruction and requirement exceed max_prompt_chars={cap}")
        source, edit, target = (
            self._image(body, "source"),
            self._image(body, "edit"),
            self._image(body, "target", False),
        )
        for name, image in (("edit", edit), ("target", target)):
            if image is not None and image.shape != source.shape:
                raise RequestError(400, f"{name} is {tuple(image.shape[-2:])} but source is {tuple(source.shape[-2:])}")
        if target is None and getattr(self.reward, "needs_targets", False):
            raise RequestError(400, f"{self.model_name} needs a target image")
        inputs = RewardInputs(source, edit, [instruction], [requirement], targets=target)
        with self._lock:
            value = self.reward.score(inputs).float().reshape(-1)
        if value.shape != (1,) or not (math.isnan(float(value[0])) or 0.0 <= float(value[0]) <= 1.0):
            raise RuntimeError(f"the served reward returned {value.tolist()} for one edit (one value in [0, 1])")
        v = float(value[0])
        return {"score": None if math.isnan(v) else v, "model": self.model_name}

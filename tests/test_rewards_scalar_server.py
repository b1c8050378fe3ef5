"""`editr1 serve-reward --reward`: any Python reward on POST /v1/score over a real loopback server, its checks
(model name, images, sizes, targets, limits, token), and the reward class loading."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

from editr1.images import data_url
from editr1.rewards.base import RewardModel
from editr1.rewards.preservation import PreservationReward
from editr1.rewards.scalar_server import ScalarRewardServer, load_reward
from editr1.rewards.server import serve_reward
from editr1.rewards.server_http import Limits


def _png(color, size=(16, 16)) -> str:
    return data_url(Image.new("RGB", size, color))


def _post(url: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class NaNReward(RewardModel):
    def score(self, inputs):
        return torch.full((inputs.edits.shape[0],), float("nan"))


@pytest.fixture
def server():
    srv = ScalarRewardServer(
        PreservationReward(), port=0, model_name="keep", limits=Limits(max_prompt_chars=50)
    ).start()
    yield srv
    srv.shutdown()


def test_scores_one_edit_like_the_reward_itself(server):
    body = {"source": _png((200, 10, 10)), "edit": _png((200, 10, 10)), "instruction": "keep it"}
    assert _post(server.url + "/score", body) == (200, {"score": pytest.approx(1.0), "model": "keep"})
    code, out = _post(server.url + "/score", {**body, "edit": _png((10, 10, 200))})
    assert code == 200 and 0.0 <= out["score"] < 1.0


def test_bad_requests_are_4xx_with_a_reason(server):
    ok = {"source": _png((1, 2, 3)), "edit": _png((1, 2, 3)), "instruction": "x"}
    cases = [
        ({**ok, "model": "other"}, 404, "The model `other` does not exist."),
        ({**ok, "source": None}, 400, "source must be an image as a data: URL"),
        ({**ok, "edit": _png((1, 2, 3), (12, 16))}, 400, "edit is (16, 12) but source is (16, 16)"),
        ({**ok, "instruction": 3}, 400, "instruction (and requirement, if given) must be strings"),
        ({**ok, "instruction": "x" * 51}, 400, "exceed max_prompt_chars=50"),
        ({**ok, "edit": "data:image/png;base64,AAAA"}, 400, "image could not be decoded"),
    ]
    for body, status, message in cases:
        code, out = _post(server.url + "/score", body)
        assert (code, status) == (status, status) and message in out["error"]["message"], (body.keys(), out)
    assert _post(server.url + "/chat/completions", ok)[0] == 404  # only /v1/score here


def test_a_reward_that_cannot_judge_answers_null_and_tokens_are_checked():
    srv = ScalarRewardServer(NaNReward(), port=0, api_key="s3cret").start()
    try:
        body = {"source": _png((1, 2, 3)), "edit": _png((1, 2, 3)), "instruction": "x"}
        assert _post(srv.url + "/score", body)[0] == 401
        assert _post(srv.url + "/score", body, token="s3cret") == (200, {"score": None, "model": "NaNReward"})
    finally:
        srv.shutdown()


def test_loading_reward_classes():
    reward = load_reward("editr1.rewards.preservation:PreservationReward", {"kernel_size": 7, "sigma": 0.8})
    assert isinstance(reward, PreservationReward) and reward.kernel_size == 7
    assert isinstance(load_reward("editr1.rewards.preservation.PreservationReward"), PreservationReward)
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        load_reward("editr1.rewards.preservation:Nope")
    with pytest.raises(ValueError, match="is a Limits, not an editr1.rewards.RewardModel"):
        load_reward("editr1.rewards.server_http:Limits")
    with pytest.raises(SystemExit, match="give --model \\(a judge\\) or --reward"):
        serve_reward(model="x", reward="editr1.rewards.preservation:PreservationReward", port=0)
    with pytest.raises(SystemExit, match="No module named 'nowhere'"):
        serve_reward(reward="nowhere:Reward", port=0)

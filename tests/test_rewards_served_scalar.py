"""The served scalar reward client: against editr1's own scalar server (scores equal the local reward's), and
against a stub server answering out-of-range, null, malformed and failing bodies (counted by reason, never a
made-up number)."""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from editr1.rewards.base import RewardInputs
from editr1.rewards.preservation import PreservationReward
from editr1.rewards.scalar_server import ScalarRewardServer
from editr1.rewards.served import RewardServerError
from editr1.rewards.served_scalar import ServedScalarReward, read_score, to_unit


def _inputs(n: int = 3, seed: int = 0) -> RewardInputs:
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(n, 3, 16, 16, generator=g)
    edits = (src + 0.3 * torch.rand(n, 3, 16, 16, generator=g)).clamp(0, 1)
    return RewardInputs(src, edits, ["keep it"] * n, [""] * n, source_ids=list(range(n)))


def test_read_score_and_the_range_by_hand():
    assert read_score({"score": 3}) == 3.0 and math.isnan(read_score({"score": None}))
    assert read_score({"reward": 0.5}, "reward") == 0.5
    for bad in ({"score": "3"}, {"score": True}, {"score": float("inf")}, [1], {"other": 1}):
        with pytest.raises(ValueError):
            read_score(bad)
    assert to_unit(3.0, -1.0, 4.0) == pytest.approx(0.8)


def test_scores_equal_the_local_reward_through_editr1s_server():
    srv = ScalarRewardServer(PreservationReward(), port=0).start()
    client = ServedScalarReward(base_url=srv.url, api_key_env=None, model="PreservationReward")
    try:
        inputs = _inputs()
        local = PreservationReward().score(inputs)
        served = client.submit(inputs).result(timeout=60)
        torch.testing.assert_close(served, local, atol=2e-3, rtol=0)  # PNG round trip of the images (8 bits)
        assert client.stats()["requests"] == 3.0
    finally:
        client.close()
        srv.shutdown()


class Stub(BaseHTTPRequestHandler):
    answers: list = []  # one JSON body (or an int: that status) per request, in order

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - stdlib name
        self.rfile.read(int(self.headers["Content-Length"]))
        answer = self.answers.pop(0)
        status, data = (answer, b"{}") if isinstance(answer, int) else (200, json.dumps(answer).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_out_of_range_null_malformed_and_failed_answers_are_counted(stub):
    httpd, url = stub
    Stub.answers = [{"score": 4.0}, {"score": 6.0}, {"score": None}, {"score": "x"}, 503]
    client = ServedScalarReward(url, api_key_env=None, score_range=(0, 5), max_concurrency=1, max_retries=0)
    got = client.score(_inputs(5)).tolist()
    assert got[0] == pytest.approx(0.8) and all(math.isnan(v) for v in got[1:])
    stats = client.stats()
    assert stats["failed/out_of_range"] == 1 and stats["failed/not_judged"] == 1
    assert stats["failed/malformed_response"] == 1 and stats["failed/http_503"] == 1
    Stub.answers = [{"score": 6.0}]
    clamping = ServedScalarReward(url, api_key_env=None, score_range=(0, 5), out_of_range="clamp", max_retries=0)
    assert clamping.score(_inputs(1)).tolist() == [1.0] and clamping.stats()["clamped"] == 1
    Stub.answers = [404]
    with pytest.raises(RewardServerError, match="HTTP 404"):
        ServedScalarReward(url, api_key_env=None).score(_inputs(1))
    for c in (client, clamping):
        c.close()


def test_a_dead_server_gives_nan_not_a_number():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ServedScalarReward(f"http://127.0.0.1:{port}/v1", api_key_env=None, max_retries=1, retry_backoff=0.01)
    assert all(math.isnan(v) for v in client.score(_inputs(2)).tolist())
    assert client.stats()["failed/connection"] == 2
    with pytest.raises(ValueError, match="score_range needs high > low"):
        ServedScalarReward(score_range=(1, 1))

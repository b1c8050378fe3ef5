"""`editr1 serve-reward`: the OpenAI-compatible judge server's protocol subset, limits and errors."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from editr1.rewards import LocalMLLMReward
from editr1.rewards.server import Limits, RewardServer

SHORT = "Instruction: make it blue. Requirement: none. Score 0-5."


def png_url(size=(32, 32), color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(**overrides) -> dict:
    b = {
        "model": "judge",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_url()}},
                    {"type": "image_url", "image_url": {"url": png_url(color=(20, 20, 220))}},
                    {"type": "text", "text": SHORT},
                ],
            }
        ],
        "max_tokens": 1,
        "logprobs": True,
        "top_logprobs": 20,
        "temperature": 0,
    }
    b.update(overrides)
    return b


def post(url: str, payload, headers=None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(
        url + "/chat/completions", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def judge():
    return LocalMLLMReward(torch_dtype="float32").to("cpu").judge


@pytest.fixture(scope="module")
def server(judge):
    srv = RewardServer(
        judge, port=0, limits=Limits(max_request_bytes=200_000, max_images=2, max_image_pixels=4096)
    ).start()
    yield srv
    srv.shutdown()


def test_binds_loopback_and_lists_its_model(server):
    assert server.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server.url + "/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "editr1-tiny-judge"


def test_chat_completion_with_top_logprobs(server):
    status, out = post(server.url, body())
    assert status == 200
    entry = out["choices"][0]["logprobs"]["content"][0]
    assert len(entry["top_logprobs"]) == 20
    tops = {t["token"] for t in entry["top_logprobs"]}
    assert set("012345") <= tops  # the tiny judge answers with digits
    assert entry["token"] == out["choices"][0]["message"]["content"]
    lps = [t["logprob"] for t in entry["top_logprobs"]]
    assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)


def test_generation_of_several_tokens(server):
    status, out = post(server.url, body(max_tokens=3, top_logprobs=2))
    assert status == 200
    assert len(out["choices"][0]["logprobs"]["content"]) <= 3
    assert all(len(e["top_logprobs"]) == 2 for e in out["choices"][0]["logprobs"]["content"])


@pytest.mark.parametrize(
    "payload, raw, status, words",
    [
        (None, b"{not json", 400, "not valid JSON"),
        (None, b'"a string"', 400, "JSON object"),
        (body(temperature=0.7), None, 400, "temperature"),
        (body(top_logprobs=21), None, 400, "top_logprobs"),
        (body(max_tokens=0), None, 400, "max_tokens"),
        (body(messages=[]), None, 400, "messages"),
        (
            body(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}],
                    }
                ]
            ),
            None,
            400,
            "data: URLs",
        ),
        (
            body(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
                    }
                ]
            ),
            None,
            400,
            "base64",
        ),
        (
            body(
                messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url((100, 100))}}]}
                ]
            ),
            None,
            413,
            "pixels",
        ),
        (
            body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}}] * 3}]),
            None,
            413,
            "images",
        ),
        (body(messages=[{"role": "tool", "content": "x"}]), None, 400, "role"),
    ],
)
def test_bad_requests_get_json_errors(server, payload, raw, status, words):
    code, out = post(server.url, payload, raw=raw)
    assert code == status
    assert words in out["error"]["message"]
    assert "Traceback" not in json.dumps(out)


def test_oversized_request_is_refused_before_reading_it(server):
    code, out = post(server.url, None, raw=b"x" * 300_000)
    assert code == 413 and "exceeds" in out["error"]["message"]


def test_internal_errors_do_not_leak_tracebacks(judge, monkeypatch):
    srv = RewardServer(judge, port=0).start()
    try:
        monkeypatch.setattr(srv.judge, "chat_text", lambda m: (_ for _ in ()).throw(RuntimeError("secret path /x/y")))
        code, out = post(srv.url, body())
    finally:
        srv.shutdown()
    assert code == 500
    assert out["error"]["message"] == "internal error while judging"
    assert "secret" not in json.dumps(out)


def test_bearer_token(judge):
    srv = RewardServer(judge, port=0, api_key="tok3n").start()
    try:
        assert post(srv.url, body())[0] == 401
        assert post(srv.url, body(), headers={"Authorization": "Bearer wrong"})[0] == 401
        assert post(srv.url, body(), headers={"Authorization": "Bearer tok3n"})[0] == 200
    finally:
        srv.shutdown()


def test_concurrent_one_token_requests_are_batched(judge, monkeypatch):
    srv = RewardServer(judge, port=0, limits=Limits(batch_wait_s=0.2, max_batch=8)).start()
    sizes = []
    real = judge.next_token_logits

    def spy(texts, images):
        sizes.append(len(texts))
        return real(texts, images)

    monkeypatch.setattr(judge, "next_token_logits", spy)
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(srv.url, body()))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        srv.shutdown()
    assert [r[0] for r in results] == [200] * 4
    assert sum(sizes) == 4 and max(sizes) > 1
    # Identical requests get identical answers whether batched or not.
    assert len({json.dumps(r[1]["choices"][0]["logprobs"]) for r in results}) == 1


def test_serve_reward_command(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "editr1",
            "serve-reward",
            "--torch_dtype",
            "float32",
            "--device",
            "cpu",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "server did not start"
                time.sleep(0.5)
        code, out = post(url, body())
        assert code == 200 and out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_data_url_helpers_round_trip_and_refuse_what_the_server_refuses():
    from editr1.images import ImageTooLarge, data_url, data_url_bytes, decode_image

    img = Image.new("RGB", (12, 8), (200, 30, 30))
    url = data_url(img)
    assert url.startswith("data:image/png;base64,") and data_url(img, "jpg").startswith("data:image/jpeg;base64,")
    back = decode_image(data_url_bytes(url), 12 * 8)
    assert back.size == (12, 8) and back.getpixel((3, 3)) == (200, 30, 30)
    with pytest.raises(ImageTooLarge, match="12x8 exceeds 95 pixels"):
        decode_image(data_url_bytes(url), 12 * 8 - 1)
    for bad, why in [
        ("http://example.com/x.png", "data: URLs"),
        ("data:image/png,abc", "base64-encoded"),
        ("data:image/png;base64,@@@", "not valid base64"),
    ]:
        with pytest.raises(ValueError, match=why):
            data_url_bytes(bad)

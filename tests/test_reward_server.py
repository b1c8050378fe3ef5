"""`editr1 serve-reward`: the OpenAI-compatible judge server's protocol subset, limits and errors."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
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
        "model": "editr1-tiny-judge",
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
        deadline = time.time() + 300  # generous: a loaded machine starts Python slowly
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


def user(*parts) -> list[dict]:
    """One user message of these parts: str → a text part, (w, h) → a PNG of that size."""
    content = [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": {"url": png_url(p)}}
        for p in parts
    ]
    return [{"role": "user", "content": content}]


def call(url: str, method: str, path: str = "/chat/completions"):
    req = urllib.request.Request(url + path, method=method, data=b"{}" if method in ("PUT", "PATCH") else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_one_bad_request_in_a_batch_is_answered_400_and_the_good_ones_200(judge, monkeypatch):
    """A 1x600 image the processor refuses (aspect ratio over 200) is batched with three good requests: the
    batch fails, its requests are judged one by one, the bad one gets a 400 naming the processor's reason and
    the good ones their answers, equal to a lone request's."""
    srv = RewardServer(judge, port=0, limits=Limits(batch_wait_s=0.3, max_batch=8)).start()
    sizes = []
    real = judge.next_token_logits

    def spy(texts, images):
        sizes.append(len(texts))
        return real(texts, images)

    monkeypatch.setattr(judge, "next_token_logits", spy)
    bad = body(messages=user((1, 600), (32, 32), SHORT))
    try:
        lone = post(srv.url, body())
        results = {}
        threads = [
            threading.Thread(target=lambda i=i: results.update({i: post(srv.url, bad if i == 2 else body())}))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        srv.shutdown()
    assert max(sizes) > 1  # they were batched
    assert [results[i][0] for i in range(4)] == [200, 200, 400, 200]
    error = results[2][1]["error"]
    assert error["code"] == 400 and "processor" in error["message"] and "aspect ratio" in error["message"]
    good = {json.dumps(results[i][1]["choices"][0]["logprobs"]) for i in (0, 1, 3)}
    assert good == {json.dumps(lone[1]["choices"][0]["logprobs"])}


def test_a_refused_image_alone_and_in_generation_is_a_400(server):
    for max_tokens in (1, 3):
        code, out = post(server.url, body(messages=user((1, 600), SHORT), max_tokens=max_tokens, top_logprobs=2))
        assert code == 400 and "aspect ratio" in out["error"]["message"], out


def test_a_server_fault_in_a_batch_stays_a_500_without_details(judge, monkeypatch):
    srv = RewardServer(judge, port=0, limits=Limits(batch_wait_s=0.2)).start()
    monkeypatch.setattr(judge, "next_token_logits", lambda t, i: (_ for _ in ()).throw(RuntimeError("CUDA /x/y")))
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(srv.url, body()))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        srv.shutdown()
    assert [r[0] for r in results] == [500] * 3
    assert {r[1]["error"]["message"] for r in results} == {"internal error while judging"}


def test_prompt_length_and_prompt_tokens_are_capped(judge):
    srv = RewardServer(judge, port=0, limits=Limits(max_prompt_chars=200, max_prompt_tokens=160)).start()
    try:
        assert post(srv.url, body(messages=user((32, 32), "x" * 100)))[0] == 200
        code, out = post(srv.url, body(messages=user((32, 32), "x" * 150, "y" * 51)))  # 201 characters
        assert code == 400 and "max_prompt_chars" in out["error"]["message"] and "201" in out["error"]["message"]
        code, out = post(srv.url, body(messages=[{"role": "system", "content": "z" * 201}]))
        assert code == 400 and "max_prompt_chars" in out["error"]["message"]
        code, out = post(srv.url, body(messages=user((32, 32), "x" * 190)))  # one byte-level token a character
        assert code == 400 and "max_prompt_tokens" in out["error"]["message"]
    finally:
        srv.shutdown()
    assert Limits().max_prompt_chars > 0 and Limits().max_prompt_tokens > 0


def test_json_nested_too_deep_is_a_400(server):
    for raw in (b"[" * 100_000, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", b"1" * 5000):
        code, out = post(server.url, None, raw=raw)
        assert code == 400 and "Traceback" not in json.dumps(out), (raw[:20], out)


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH", "OPTIONS"])
def test_other_methods_are_a_json_405(server, method):
    code, headers, raw = call(server.url, method)
    assert code == 405 and headers["Content-Type"] == "application/json"
    assert headers["Allow"] == "GET, POST"
    assert method in json.loads(raw)["error"]["message"]


def test_protocol_errors_are_json_too(server):
    code, headers, raw = call(server.url, "BREW")  # an unknown method: the standard library's 501
    assert code == 501 and headers["Content-Type"] == "application/json"
    assert json.loads(raw)["error"]["code"] == 501
    code, headers, raw = call(server.url, "HEAD", "/health")
    assert code == 405 and raw == b""


def test_a_silent_connection_is_closed_after_the_socket_timeout(judge):
    srv = RewardServer(judge, port=0, limits=Limits(socket_timeout_s=0.5)).start()
    host, port = srv.httpd.server_address[:2]
    try:
        with socket.create_connection((host, port), timeout=10) as half_open:
            half_open.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            t0 = time.perf_counter()
            assert half_open.recv(1024) == b""  # the server closed it
            assert time.perf_counter() - t0 < 5
        with socket.create_connection((host, port), timeout=10) as slow_body:
            slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            reply = slow_body.recv(4096)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 408")
        assert post(srv.url, body())[0] == 200  # and it still serves
    finally:
        srv.shutdown()
    assert Limits().socket_timeout_s == 60.0


def test_an_unknown_model_is_a_404_as_vllm_answers(server):
    code, out = post(server.url, body(model="gpt-9"))
    assert code == 404
    assert out["error"]["message"] == "The model `gpt-9` does not exist."
    assert out["error"]["type"] == "NotFoundError" and out["error"]["code"] == 404
    without = body()
    del without["model"]
    assert post(server.url, without)[0] == 200  # no model named: the one served


def test_streaming_is_refused_clearly(server):
    code, out = post(server.url, body(stream=True))
    assert code == 400 and "stream" in out["error"]["message"]
    assert post(server.url, body(stream=False))[0] == 200


def test_a_text_only_request_is_answered(server):
    for max_tokens in (1, 2):
        code, out = post(
            server.url, body(messages=[{"role": "user", "content": "Say a digit."}], max_tokens=max_tokens)
        )
        assert code == 200, out
        entry = out["choices"][0]["logprobs"]["content"][0]
        assert len(entry["top_logprobs"]) == 20


def test_device_defaults_to_the_gpu_when_there_is_one(monkeypatch):
    import inspect

    from editr1.rewards import server as server_module

    assert inspect.signature(server_module.serve_reward).parameters["device"].default == "auto"
    monkeypatch.setattr(server_module.torch.cuda, "is_available", lambda: True)
    assert server_module.resolve_device("auto") == "cuda"
    monkeypatch.setattr(server_module.torch.cuda, "is_available", lambda: False)
    assert server_module.resolve_device("auto") == "cpu"
    assert server_module.resolve_device("cuda:1") == "cuda:1"


def test_the_official_openai_client_gets_top_logprobs(server):
    import openai  # the dev extra has it

    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30)
    try:
        out = client.chat.completions.create(
            model="editr1-tiny-judge",
            messages=user((32, 32), (32, 32), SHORT),
            max_tokens=1,
            temperature=0,
            logprobs=True,
            top_logprobs=20,
        )
        entry = out.choices[0].logprobs.content[0]
        assert out.model == "editr1-tiny-judge" and entry.token == out.choices[0].message.content
        assert len(entry.top_logprobs) == 20 and set("012345") <= {t.token for t in entry.top_logprobs}
        assert all(t.logprob <= 0 for t in entry.top_logprobs)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(model="nope", messages=user(SHORT), max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(model="editr1-tiny-judge", messages=user(SHORT), temperature=0.9)
        assert [m.id for m in client.models.list()] == ["editr1-tiny-judge"]
    finally:
        client.close()

"""The OpenAI-protocol HTTP client shared by the served reward and the served judge, against a loopback fake."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import Counter

import pytest

from editr1.rewards.http import OpenAIClient, retryable
from fake_openai import FakeOpenAI

TOP = [("4", -0.5), ("1", -1.6)]
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def content(data) -> str:
    return data["choices"][0]["message"]["content"]


class Refused(RuntimeError):
    pass


def make(url, **kw):
    kw.setdefault("max_retries", 2)
    kw.setdefault("retry_backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    return OpenAIClient(url, refused=Refused, label="test server", **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retryable_statuses():
    assert all(retryable(s) for s in (408, 409, 429, 500, 502, 503, 504))
    assert not any(retryable(s) for s in (400, 401, 403, 404, 413, 422))


def test_success_returns_the_parsed_answer_and_counts_one_request():
    with FakeOpenAI([("ok", TOP)]) as fake:
        c = make(fake.url)
        assert c.post("chat/completions", BODY, content) == "4"
        c.close()
    assert c.counts == Counter(requests=1)
    assert fake.requests[0]["body"] == BODY


def test_retryable_status_then_success():
    with FakeOpenAI([("status", 503), ("status", 429), ("ok", TOP)]) as fake:
        c = make(fake.url)
        assert c.post("chat/completions", BODY, content) == "4"
        c.close()
    assert c.counts == Counter({"requests": 3, "retries": 2, "errors/http_503": 1, "errors/http_429": 1})


def test_retryable_status_every_time_gives_none_after_bounded_retries():
    with FakeOpenAI([("status", 500)]) as fake:
        c = make(fake.url, max_retries=1)
        assert c.post("chat/completions", BODY, content) is None
        c.close()
    assert c.counts == Counter({"requests": 2, "retries": 1, "errors/http_500": 2, "failed/http_500": 1})
    assert len(fake.requests) == 2


def test_configuration_status_raises_the_callers_error_with_the_servers_message_without_retrying():
    with FakeOpenAI([("status", 404), ("ok", TOP)]) as fake:
        c = make(fake.url)
        with pytest.raises(
            Refused,
            match=r"test server http://127\.0\.0\.1:\d+/v1 refused the request \(HTTP 404\): "
            r"scripted 404",
        ):
            c.post("chat/completions", BODY, content)
        c.close()
    assert len(fake.requests) == 1 and c.counts == Counter(requests=1)


def test_api_key_header_from_the_environment_and_never_logged(monkeypatch, caplog):
    monkeypatch.setenv("EDITR1_TEST_KEY", "s3cret-value")
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI([("ok", TOP)]) as fake:
        with_key = make(fake.url, api_key_env="EDITR1_TEST_KEY")
        without = make(fake.url, api_key_env="EDITR1_TEST_KEY_UNSET")
        no_env = make(fake.url, api_key_env=None)
        for c in (with_key, without, no_env):
            assert c.post("chat/completions", BODY, content) == "4"
            c.close()
    headers = [{k.lower(): v for k, v in r["headers"].items()} for r in fake.requests]
    assert headers[0]["authorization"] == "Bearer s3cret-value"
    assert "authorization" not in headers[1] and "authorization" not in headers[2]
    assert "s3cret-value" not in caplog.text


def test_dead_port_gives_none_after_bounded_retries_with_exponential_backoff():
    c = make(f"http://127.0.0.1:{free_port()}/v1", max_retries=2, retry_backoff=0.1)
    t0 = time.perf_counter()
    assert c.post("chat/completions", BODY, content) is None
    elapsed = time.perf_counter() - t0
    c.close()
    assert c.counts == Counter({"requests": 3, "retries": 2, "errors/connection": 3, "failed/connection": 1})
    assert 0.3 <= elapsed < 5  # waits of 0.1 s then 0.2 s between the three attempts


def test_timeouts_are_retried_then_counted():
    with FakeOpenAI([("slow", 1.0, TOP)]) as fake:
        c = make(fake.url, timeout=0.2, max_retries=1)
        assert c.post("chat/completions", BODY, content) is None
        c.close()
    assert c.counts["errors/timeout"] == 2 and c.counts["failed/timeout"] == 1


def test_malformed_answers_are_retried_and_a_rejecting_parser_counts_as_malformed():
    with FakeOpenAI([("malformed",), ("ok", TOP)]) as fake:
        c = make(fake.url)
        assert c.post("chat/completions", BODY, content) == "4"
        c.close()
    assert c.counts == Counter({"requests": 2, "retries": 1, "errors/malformed_response": 1})

    def reject(data):
        raise KeyError("no such field")

    with FakeOpenAI([("ok", TOP)]) as fake:
        c = make(fake.url, max_retries=0)
        assert c.post("chat/completions", BODY, reject) is None
        c.close()
    assert c.counts == Counter({"requests": 1, "errors/malformed_response": 1, "failed/malformed_response": 1})


def test_counts_go_into_the_callers_counter_and_concurrency_is_bounded():
    counts, lock = Counter(), threading.Lock()
    with FakeOpenAI([("slow", 0.3, TOP)]) as fake:
        c = make(fake.url, max_concurrency=2, counts=counts, lock=lock)
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(c.post("chat/completions", BODY, content))) for _ in range(4)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = time.perf_counter() - t0
        c.close()
    assert c.counts is counts and counts == Counter(requests=4)
    assert results == ["4"] * 4
    assert 0.55 < total < 1.5  # 4 requests, 2 at a time, 0.3 s each


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_retries"):
        OpenAIClient("http://127.0.0.1:1/v1", max_retries=-1)
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIClient("http://127.0.0.1:1/v1", max_concurrency=0)


@pytest.mark.parametrize(
    "step, parse",
    [
        (("ok", TOP), lambda data: data["choices"][0]["message"].strip()),  # AttributeError: a dict has no strip
        (
            ("ok", TOP),
            lambda data: math.exp(data["choices"][0]["logprobs"]["content"][0]["logprob"] * -10_000),
        ),  # OverflowError
        (("raw", b"[" * 100_000), content),  # RecursionError while decoding
        (("json", {"choices": "not a list"}), content),  # TypeError
        (("raw", b"\xff\xfe"), content),  # not UTF-8
    ],
)
def test_any_bad_answer_is_malformed_and_never_raises(step, parse, caplog):
    caplog.set_level(logging.DEBUG, logger="editr1.rewards.http")
    with FakeOpenAI([step]) as fake:
        c = make(fake.url, max_retries=1)
        assert c.post("chat/completions", BODY, parse) is None
        c.close()
    assert c.counts == Counter(
        {"requests": 2, "retries": 1, "errors/malformed_response": 2, "failed/malformed_response": 1}
    )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "malformed answer" in warnings[0].getMessage()  # once, then at debug level

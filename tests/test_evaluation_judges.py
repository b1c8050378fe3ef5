"""Benchmark judges without a model or a server: ask_parsed's bookkeeping, the local judge's chat layout and
batching (on a stand-in for the MLLM), and the served judge's settings, payloads, answers and pickling.
(test_benchmark.py runs both against the tiny judge and a scripted HTTP judge.)"""

from __future__ import annotations

import pickle

import pytest
from PIL import Image

from editr1.evaluation.judges import JudgeRequest, LocalJudge, ServedJudge, TextJudge, ask_parsed
from editr1.images import data_url_bytes, decode_image


class Echo(TextJudge):
    """Answers each request from a queue per text (None: transport failure); records each generate call."""

    def __init__(self, answers: dict[str, list]) -> None:
        super().__init__()
        self.answers = {k: list(v) for k, v in answers.items()}
        self.batches: list[list[str]] = []

    def generate(self, requests):
        self.batches.append([r.text for r in requests])
        return [self.answers[r.text].pop(0) for r in requests]

    def info(self):
        return {"kind": "echo"}


def _img(w: int = 16, h: int = 16) -> Image.Image:
    return Image.new("RGB", (w, h), (90, 120, 150))


# ---------------------------------------------------------------------------------------------- ask_parsed
def test_one_parser_per_request_and_falsy_values_count_as_parsed():
    judge = Echo({"n": ["0"], "w": ["yes"], "e": [""]})
    out = ask_parsed(
        judge,
        [JudgeRequest([], "n"), JudgeRequest([], "w"), JudgeRequest([], "e")],
        [int, lambda a: a == "yes", lambda a: a],
    )
    assert [o.value for o in out] == [0, True, ""]  # only None means rejected
    assert [o.failure for o in out] == [None, None, None] and [o.attempts for o in out] == [1, 1, 1]


def test_a_later_success_clears_the_failure_and_keeps_every_answer():
    judge = Echo({"a": [None, "junk", "4"], "b": ["2"]})
    parse = lambda t: int(t) if t.isdigit() else None  # noqa: E731
    a, b = ask_parsed(judge, [JudgeRequest([], "a"), JudgeRequest([], "b")], parse, max_attempts=3)
    assert (a.value, a.attempts, a.failure, a.answers) == (4, 3, None, [None, "junk", "4"])
    assert (b.value, b.attempts) == (2, 1)
    assert judge.batches == [["a", "b"], ["a"], ["a"]]  # only what is still pending is asked again


def test_one_attempt_no_requests_and_mismatched_parsers():
    judge = Echo({"a": ["junk"]})
    (r,) = ask_parsed(judge, [JudgeRequest([], "a")], lambda t: None, max_attempts=1)
    assert (r.value, r.attempts, r.failure) == (None, 1, "parse")
    assert ask_parsed(judge, [], int) == [] and len(judge.batches) == 1  # nothing asked
    with pytest.raises(ValueError, match="2 parsers for 1 requests"):
        ask_parsed(judge, [JudgeRequest([], "a")], [int, int])
    with pytest.raises(ValueError, match="max_attempts must be >= 1, got 0"):
        ask_parsed(judge, [JudgeRequest([], "a")], int, max_attempts=0)


def test_text_judge_defaults():
    judge = Echo({})
    assert judge.to("cpu") is judge and judge.close() is None and judge.counts == {}
    assert JudgeRequest([], "t").text_first is False
    with pytest.raises(TypeError):
        TextJudge()


# ---------------------------------------------------------------------------------------------- local
class StandIn:
    """What LocalJudge uses of MLLMJudge: chat_text and generate (the answer says what it saw)."""

    def __init__(self) -> None:
        self.turns: list = []
        self.calls: list = []

    def chat_text(self, messages):
        self.turns.append(messages)
        return "|".join(p["type"] for p in messages[0]["content"])

    def generate(self, texts, images, max_new_tokens):
        self.calls.append((texts, [[im.size for im in ims] for ims in images], max_new_tokens))
        return [f"{t} {len(ims)}" for t, ims in zip(texts, images)]


def test_local_judge_settings_are_checked_before_anything_loads():
    with pytest.raises(ValueError, match="max_new_tokens >= 1 and batch_size >= 1"):
        LocalJudge(max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens >= 1 and batch_size >= 1"):
        LocalJudge(batch_size=0)
    judge = LocalJudge(torch_dtype="float32", max_new_tokens=7)
    info = judge.info()  # nothing loaded yet: no commit to report
    assert info["kind"] == "local" and info["commit"] is None and info["dtype"] == "float32"
    assert info["max_new_tokens"] == 7 and info["quantization"] == "none"


def test_local_judge_lays_out_each_turn_batches_requests_and_limits_pixels():
    judge = LocalJudge(batch_size=2, max_new_tokens=5, max_pixels=8 * 8)
    judge.model = StandIn()
    requests = [
        JudgeRequest([_img(), _img(4, 4)], "a"),
        JudgeRequest([_img(32, 8)], "b", text_first=True),
        JudgeRequest([], "c"),
    ]
    assert judge.generate(requests) == ["image|image|text 2", "text|image 1", "text 0"]
    assert [len(texts) for texts, _, _ in judge.model.calls] == [2, 1]  # batches of 2
    sizes = judge.model.calls[0][1]
    assert sizes == [[(8, 8), (4, 4)], [(16, 4)]]  # downscaled to at most 64 pixels, small ones kept
    assert all(n == 5 for _, _, n in judge.model.calls) and judge.counts["requests"] == 3
    assert judge.model.turns[1][0]["content"][0] == {"type": "text", "text": "b"}


# ---------------------------------------------------------------------------------------------- served
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_concurrency": 0}, "max_concurrency >= 1"),
        ({"max_retries": -1}, "max_retries >= 0"),
        ({"timeout": 0}, "timeout > 0"),
        ({"max_tokens": 0}, "max_tokens >= 1"),
        ({"image_format": "webp"}, "image_format must be png or jpeg, got 'webp'"),
    ],
)
def test_served_judge_settings_are_checked(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ServedJudge(**kwargs)


def test_payload_images_format_pixels_and_seed():
    judge = ServedJudge(model="m", seed=None, max_tokens=9, max_pixels=10 * 10, image_format="JPG")
    body = judge.payload(JudgeRequest([_img(40, 10)], "rate it"))
    assert set(body) == {"model", "messages", "temperature", "max_tokens"}  # no seed when None
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("m", 0.0, 9)
    image, text = body["messages"][0]["content"]
    assert text == {"type": "text", "text": "rate it"}
    url = image["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert decode_image(data_url_bytes(url), 10**6).size == (20, 5)  # 200 pixels → within 100, aspect kept
    assert ServedJudge(seed=3).payload(JudgeRequest([], "x"))["seed"] == 3


def test_answers_are_read_and_who_answered_is_recorded():
    judge = ServedJudge(model="asked-for")
    body = {"model": "served-as", "system_fingerprint": "fp1", "choices": [{"message": {"content": "7"}}]}
    assert judge._answer(body) == "7" and judge._answer(body) == "7"
    judge._answer({"choices": [{"message": {"content": "x"}}]})  # a server that reports neither
    info = judge.info()
    assert info["model"] == "asked-for" and info["kind"] == "served" and info["temperature"] == 0.0
    assert info["served_as"] == [
        {"model": "None", "system_fingerprint": "None", "answers": 1},
        {"model": "served-as", "system_fingerprint": "fp1", "answers": 2},
    ]
    with pytest.raises(TypeError):
        judge._answer({"choices": [{"message": {"content": None}}]})
    with pytest.raises(KeyError):
        judge._answer({"error": "overloaded"})


def test_no_request_means_no_client_and_close_is_safe():
    judge = ServedJudge(base_url="http://127.0.0.1:9/v1")
    assert judge.generate([]) == [] and judge._client is None
    judge.close()
    judge.close()


def test_a_served_judge_pickles_without_its_client_or_lock():
    judge = ServedJudge(model="m", base_url="http://127.0.0.1:9/v1")
    judge.reported[("m", "fp")] = 2
    judge._get_client()
    copy = pickle.loads(pickle.dumps(judge))  # e.g. to a worker process
    assert copy._client is None and copy.reported == {("m", "fp"): 2} and copy.model == "m"
    with copy._lock:  # a fresh, working lock
        pass
    judge.close()
    assert judge._client is None

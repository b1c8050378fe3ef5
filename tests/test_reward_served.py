"""The served MLLM reward (OpenAI-compatible client): agreement with the local judge, faults, a fit step."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from editr1.callbacks import FilterSettings, RewardCallback
from editr1.rewards import LocalMLLMReward, RewardInputs, ServedMLLMReward
from editr1.rewards.served import RewardServerError
from editr1.rewards.server import RewardServer
from fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
SHORT = "Instruction: {instruction}. Requirement: {requirement}. Score 0-5."
TOP = [("4", math.log(0.6)), ("1", math.log(0.2)), ("yes", math.log(0.1))]  # → (0.25·1 + 0.75·4)/5 = 0.65


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(n, 3, 32, 32, generator=g)
    edits = torch.linspace(0, 1, n).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    instructions = [("make the red circle blue", "remove the square")[i % 2] for i in range(n)]
    return RewardInputs(src, edits, instructions, [""] * n, source_ids=[i // 2 for i in range(n)])


def client(url, **kw):
    kw.setdefault("max_retries", 2)
    kw.setdefault("retry_backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("model", "editr1-tiny-judge")  # the name RewardServer serves the tiny judge by
    return ServedMLLMReward(base_url=url, prompt=SHORT, **kw)


@pytest.fixture(scope="module")
def local():
    return LocalMLLMReward(torch_dtype="float32", prompt=SHORT, max_pixels=56 * 56).to("cpu")


@pytest.fixture(scope="module")
def server(local):
    srv = RewardServer(local.judge, port=0).start()
    yield srv
    srv.shutdown()


def test_served_agrees_with_local(local, server):
    c = client(server.url, max_pixels=56 * 56)
    try:
        x = inputs(8)
        served, direct = c.score(x), local.score(x)
        torch.testing.assert_close(served, direct, rtol=0, atol=1e-4)
        assert served.std() > 0.01
        assert c.stats() == {"requests": 8.0}
    finally:
        c.close()


def test_request_shape_and_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "s3cret")
    with FakeOpenAI([("ok", TOP)]) as fake:
        c = client(fake.url, api_key_env="MY_JUDGE_KEY")
        s = c.score(inputs(2))
        c.close()
    assert s.tolist() == pytest.approx([0.65, 0.65])
    req = fake.requests[0]
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert headers["authorization"] == "Bearer s3cret"
    body = req["body"]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["temperature"] == 0
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    texts = sorted(r["body"]["messages"][0]["content"][2]["text"] for r in fake.requests)
    assert "make the red circle blue" in texts[0] and "remove the square" in texts[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_not_running_gives_nan_after_bounded_retries():
    c = client(f"http://127.0.0.1:{free_port()}/v1", max_retries=2)
    s = c.score(inputs(2))
    c.close()
    assert torch.isnan(s).all()
    st = c.stats()
    assert st["failed/connection"] == 2 and st["requests"] == 6 and st["retries"] == 4


def test_too_slow_times_out_then_nan():
    with FakeOpenAI([("slow", 2.0, TOP)]) as fake:
        c = client(fake.url, timeout=0.3, max_retries=1)
        t0 = time.perf_counter()
        s = c.score(inputs(2))
        elapsed = time.perf_counter() - t0
        c.close()
    assert torch.isnan(s).all()
    assert c.stats()["failed/timeout"] == 2 and c.stats()["errors/timeout"] == 4
    assert elapsed < 1.8  # two attempts of 0.3 s each, concurrently, not 2 s waits


def test_http_500_then_success_is_retried():
    with FakeOpenAI([("status", 500), ("ok", TOP)]) as fake:
        c = client(fake.url, max_concurrency=1)
        s = c.score(inputs(2))
        c.close()
    assert s.tolist() == pytest.approx([0.65, 0.65])
    assert c.stats()["errors/http_500"] == 1 and c.stats()["retries"] == 1


def test_malformed_json_is_retried_then_nan():
    with FakeOpenAI([("malformed",)]) as fake:
        c = client(fake.url, max_retries=1)
        s = c.score(inputs(2))
        c.close()
    assert torch.isnan(s).all() and c.stats()["failed/malformed_response"] == 2
    with FakeOpenAI([("malformed",), ("ok", TOP)]) as fake:
        c = client(fake.url, max_concurrency=1)
        s = c.score(inputs(1))
        c.close()
    assert s.tolist() == pytest.approx([0.65])


def test_missing_logprobs_is_a_failure_not_a_zero():
    with FakeOpenAI([("no_logprobs",)]) as fake:
        c = client(fake.url, max_retries=0)
        s = c.score(inputs(2))
        c.close()
    assert torch.isnan(s).all() and c.stats()["failed/malformed_response"] == 2


def answer(entries: list[dict], chosen: dict | None = None) -> dict:
    """A chat-completion body whose first token has these ``top_logprobs`` entries (anything JSON holds)."""
    first = dict(chosen or {"token": "4", "logprob": -0.5}, top_logprobs=entries)
    return {"choices": [{"index": 0, "message": {"content": "4"}, "logprobs": {"content": [first]}}]}


@pytest.mark.parametrize(
    "step",
    [
        ("json", answer([{"token": 4, "logprob": -0.5}, {"token": "1", "logprob": -1.6}])),  # an integer token
        ("json", answer([{"token": ["4"], "logprob": -0.5}])),
        ("json", answer([{"token": "4", "logprob": "-0.5"}])),  # a string logprob
        ("json", answer([{"token": "4", "logprob": True}])),
        ("json", answer([{"token": "4", "logprob": -0.5}], chosen={"token": "4", "logprob": None})),
        ("ok", [("4", 1000.0), ("1", -1.6)]),  # exp overflows
        ("ok", [("4", 0.5), ("1", -1.6)]),  # a positive log-probability
        ("ok", [("4", float("nan")), ("1", -1.6)]),  # the bare word NaN, which Python's json reads
        ("ok", [("4", float("inf")), ("1", -1.6)]),
        ("ok", [("4", math.log(0.9)), ("5", math.log(0.9))]),  # probabilities summing to 1.8
        ("json", answer([{"token": "4", "logprob": -0.5}] * 2 + ["not an entry"])),
        ("json", answer({"token": "4", "logprob": -0.5})),  # an object where a list belongs
        ("json", {"choices": {"0": 1}}),
        ("json", [1, 2, 3]),
        ("raw", b"[" * 100_000),  # nested too deep for json
        ("raw", b"\xff\xfe not utf-8"),
    ],
)
def test_malformed_answers_are_nan_and_counted_never_a_crash_or_a_number(step):
    with FakeOpenAI([step]) as fake:
        c = client(fake.url, max_retries=1)
        s = c.score(inputs(2))
        c.close()
    assert torch.isnan(s).all()
    assert c.stats() == {
        "requests": 4.0,
        "retries": 2.0,
        "errors/malformed_response": 4.0,
        "failed/malformed_response": 2.0,
    }
    assert c.step_stats() == {}  # no digit mass is reported for an answer that was not read


def test_a_log_probability_rounded_just_above_zero_still_scores():
    with FakeOpenAI([("ok", [("4", 2e-7), ("1", -30.0)])]) as fake:
        c = client(fake.url)
        s = c.score(inputs(1))
        c.close()
    assert s.tolist() == pytest.approx([0.8])


def test_digits_missing_from_top_logprobs_is_nan_without_retrying():
    with FakeOpenAI([("ok", [("yes", -0.1), ("no", -2.5)])]) as fake:
        c = client(fake.url)
        s = c.score(inputs(2))
        c.close()
    assert torch.isnan(s).all()
    assert c.stats() == {"requests": 2.0, "failed/no_digits": 2.0}


def test_missing_digits_renormalize_or_fail_and_the_digit_mass_is_reported():
    """Only "4" (0.6) and "1" (0.2) come back: renormalised 0.65 (the default) or NaN under missing_digits: fail,
    counted as failed/missing_digits and never retried; the digit mass 0.8 is reported either way."""
    top = [("4", math.log(0.6)), ("1", math.log(0.2)), ("yes", math.log(0.1))]
    with FakeOpenAI([("ok", top), ("ok", [("2", math.log(0.3)), ("yes", math.log(0.6))])]) as fake:
        c = client(fake.url, max_concurrency=1)
        s = c.score(inputs(2))
        stats = c.step_stats()
        c.close()
    assert s.tolist() == pytest.approx([0.65, 0.4])
    assert stats == pytest.approx({"digit_mass_mean": 0.55, "digit_mass_min": 0.3})
    assert c.step_stats() == {}  # read once per step
    with FakeOpenAI([("ok", top)]) as fake:
        c = client(fake.url, missing_digits="fail")
        s = c.score(inputs(2))
        c.close()
    assert torch.isnan(s).all()
    assert c.stats() == {"requests": 2.0, "failed/missing_digits": 2.0}
    assert c.step_stats() == pytest.approx({"digit_mass_mean": 0.8, "digit_mass_min": 0.8})
    with pytest.raises(ValueError, match="missing_digits"):
        client("http://127.0.0.1:1/v1", missing_digits="zero")


def test_plain_digit_tokens_ignore_space_variants():
    top = [(" 5", math.log(0.5)), ("1", math.log(0.25)), ("3", math.log(0.25))]
    with FakeOpenAI([("ok", top)]) as fake:
        pooled, plain = client(fake.url), client(fake.url, digit_tokens="plain")
        a, b = pooled.score(inputs(1)), plain.score(inputs(1))
        pooled.close()
        plain.close()
    assert float(a) == pytest.approx((0.5 * 5 + 0.25 + 0.75) / 5)
    assert float(b) == pytest.approx((0.5 * 1 + 0.5 * 3) / 5)


def test_wrong_chosen_token_still_scores_from_the_digits_present():
    top = [("Sure", math.log(0.5)), ("5", math.log(0.3)), ("3", math.log(0.1))]
    with FakeOpenAI([("ok_chosen", top, "Sure")]) as fake:
        c = client(fake.url)
        s = c.score(inputs(2))
        c.close()
    assert s.tolist() == pytest.approx([(0.75 * 5 + 0.25 * 3) / 5] * 2)


def test_configuration_errors_stop_with_the_servers_message():
    with FakeOpenAI([("status", 401)]) as fake:
        c = client(fake.url)
        with pytest.raises(RewardServerError, match="401"):
            c.score(inputs(2))
        c.close()


def test_a_model_name_the_server_does_not_serve_stops_with_its_message(server):
    c = client(server.url, model="Qwen/Qwen2.5-VL-32B-Instruct")
    with pytest.raises(RewardServerError, match=r"404\): The model `Qwen/Qwen2.5-VL-32B-Instruct` does not exist"):
        c.score(inputs(1))
    c.close()
    assert c.stats() == {"requests": 1.0}  # not retried


def test_oversized_request_is_refused_with_a_json_error(local):
    from editr1.rewards.server import Limits

    srv = RewardServer(local.judge, port=0, limits=Limits(max_request_bytes=2000)).start()
    try:
        c = client(srv.url)
        with pytest.raises(RewardServerError, match="413.*exceeds"):
            c.score(inputs(2))
        c.close()
    finally:
        srv.shutdown()


def test_submit_is_asynchronous_and_concurrency_is_bounded():
    with FakeOpenAI([("slow", 0.3, TOP)]) as fake:
        c = client(fake.url, max_concurrency=2)
        t0 = time.perf_counter()
        fut = c.submit(inputs(4))
        submitted = time.perf_counter() - t0
        s = fut.result()
        total = time.perf_counter() - t0
        c.close()
    assert submitted < 0.2  # returns at once: the caller can generate the next chunk meanwhile
    assert s.tolist() == pytest.approx([0.65] * 4)
    assert 0.55 < total < 1.5  # 4 requests, 2 at a time, 0.3 s each


def test_sources_are_encoded_once_per_group():
    with FakeOpenAI([("ok", TOP)]) as fake:
        c = client(fake.url)
        c.score(inputs(4))
        c.close()
    urls = [r["body"]["messages"][0]["content"][0]["image_url"]["url"] for r in fake.requests]
    assert len(set(urls)) == 2


def test_rows_with_references_show_every_image_served_and_local_alike(local, server):
    x = inputs(4)
    g = torch.Generator().manual_seed(7)
    x.references = [[torch.rand(3, 32, 32, generator=g)] if i < 2 else [] for i in range(4)]  # group 0: picture 2
    c = client(server.url, max_pixels=56 * 56)
    try:
        served, direct = c.score(x), local.score(x)
    finally:
        c.close()
    torch.testing.assert_close(served, direct, rtol=0, atol=1e-4)
    plain = local.score(inputs(4))
    assert not torch.allclose(direct[:2], plain[:2], atol=1e-4) and torch.allclose(direct[2:], plain[2:], atol=1e-5)
    with FakeOpenAI([("ok", TOP)]) as fake:
        c = client(fake.url)
        c.score(x)
        c.close()
    contents = [r["body"]["messages"][0]["content"] for r in fake.requests]
    assert sorted(sum(part["type"] == "image_url" for part in content) for content in contents) == [2, 2, 3, 3]
    text = next(content[-1]["text"] for content in contents if len(content) == 4)
    assert text.startswith("This edit was made from 2 input images") and "picture 2 (a reference)" in text


def test_fit_step_with_the_served_reward(server, tmp_path, monkeypatch):
    from editr1.cli import cli_main

    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            "-c",
            str(ROOT / "configs" / "demo.yaml"),
            "-c",
            str(ROOT / "configs" / "demo_smoke.yaml"),
            "-c",
            str(ROOT / "configs" / "reward" / "tiny_served.yaml"),
            f"--reward.model.init_args.base_url={server.url}",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.callbacks=[]",
        ]
    )
    assert cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert float(metrics["reward_model/requests"]) == 8
    assert 0.0 <= float(metrics["reward/mean"]) <= 1.0
    assert 0.0 < float(metrics["reward_model/digit_mass_min"]) <= float(metrics["reward_model/digit_mass_mean"]) <= 1.0


class Outage(L.Callback):
    """Shuts the judge server down after optimiser step ``down_after`` and brings it back on the same
    port ``batches_down`` training batches later."""

    def __init__(self, judge, port: int, holder: dict, down_after: int = 1, batches_down: int = 1):
        self.judge, self.port, self.holder = judge, port, holder
        self.down_after, self.batches_down = down_after, batches_down
        self.down_at_batch = None
        self.weights_when_down = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.down_at_batch is None and trainer.global_step == self.down_after:
            self.holder["server"].shutdown()
            self.down_at_batch = batch_idx
            self.weights_when_down = [p.detach().clone() for p in pl_module.policy.trainable_parameters()]
        elif (
            self.down_at_batch is not None
            and batch_idx == self.down_at_batch + self.batches_down
            and self.holder.get("restart", True)
        ):
            self.holder["server"] = RewardServer(self.judge, port=self.port).start()
            self.weights_after_outage = [p.detach().clone() for p in pl_module.policy.trainable_parameters()]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outage_fit(local, tmp_path, on_failure: str, restart: bool):
    from conftest import small_module, small_trainer
    from editr1.data import EditDataModule, SceneConfig

    port = _free_port()
    holder = {"server": RewardServer(local.judge, port=port).start(), "restart": restart}
    reward = ServedMLLMReward(
        base_url=f"http://127.0.0.1:{port}/v1",
        model="editr1-tiny-judge",
        prompt=SHORT,
        max_pixels=56 * 56,
        max_retries=1,
        retry_backoff=0.05,
        timeout=10,
    )
    cb = RewardCallback(
        model=reward, log_images_every_n_steps=0, on_failure=on_failure, filter=FilterSettings(rule="none")
    )
    outage = Outage(local.judge, port, holder)
    trainer = small_trainer([outage, cb], max_steps=3, default_root_dir=str(tmp_path))  # outage acts first
    module = small_module()
    data = EditDataModule(scenes=SceneConfig(size=32), batch_size=2, train_size=64, val_size=2)
    try:
        trainer.fit(module, datamodule=data)
    finally:
        holder["server"].shutdown()
        reward.close()
    return trainer, module, cb, outage


def test_judge_outage_mid_run_drops_the_steps_groups_and_training_resumes_after(local, tmp_path):
    trainer, module, cb, outage = _outage_fit(local, tmp_path, "drop", restart=True)
    assert trainer.global_step == 3  # the outage batch trained nothing and did not count as a step
    assert cb.counts["rewards_nan"] == 8 and cb.counts["groups_dropped_nan"] == 2  # 2 groups x K = 4, never invented
    assert module.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(outage.weights_when_down, outage.weights_after_outage))
    failed = {k: v for k, v in cb.model.stats().items() if k.startswith("failed/")}
    assert failed == {"failed/connection": 8.0}


def test_judge_outage_with_on_failure_zero_trains_on_zeros_and_counts_them(local, tmp_path):
    """on_failure: zero (the reference code's behaviour): the outage step's 8 failed judgements score 0.0, are
    counted, and the step trains (no group is dropped for NaN)."""
    trainer, module, cb, outage = _outage_fit(local, tmp_path, "zero", restart=True)
    assert trainer.global_step == 3 and module.skipped_steps == 0
    assert cb.counts["rewards_failed_as_zero"] == 8 and cb.counts["rewards_nan"] == 0
    assert cb.counts["groups_dropped_nan"] == 0
    assert not all(torch.equal(a, b) for a, b in zip(outage.weights_when_down, outage.weights_after_outage))


def test_judge_outage_with_on_failure_stop_stops_with_a_checkpoint(local, tmp_path):
    with pytest.raises(RuntimeError, match="could not judge 8 of 8 edits"):
        _outage_fit(local, tmp_path, "stop", restart=False)
    saved = list(tmp_path.rglob("stopped-reward-step1.ckpt"))
    assert len(saved) == 1 and torch.load(saved[0], weights_only=True)["global_step"] == 1

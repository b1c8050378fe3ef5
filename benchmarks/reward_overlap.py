"""Benchmark: a rollout with served scoring overlapped, against the rollout alone and the scoring alone
(issue target: overlapped wall time <= 1.15 x max(rollout alone, scoring alone)).

The judge runs in its own process — `editr1 serve-reward` hosting the tiny judge (``--server tiny``),
or a stand-in with a fixed latency per request, like a remote GPU server (``--server latency``). The
rollout is the demo's tiny FLUX.1-Kontext. Each of the three is measured ``--repeats`` times,
interleaved; the best of each is reported.

    python benchmarks/reward_overlap.py --server tiny
    python benchmarks/reward_overlap.py --server latency --latency 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from editr1.data.datamodule import collate_prompts
from editr1.data.scenes import SceneConfig, SceneDataset
from editr1.module import EditR1Module, RolloutSettings
from editr1.policies import FluxKontextPolicy, LoraSettings, TinyFlux
from editr1.rewards import ServedMLLMReward

SHORT = "Instruction: {instruction}. Requirement: {requirement}. Score 0-5."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tiny_server(port: int, threads: int) -> subprocess.Popen:
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
            "--num_threads",
            str(threads),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("serve-reward did not start")


def start_latency_server(port: int, latency: float) -> subprocess.Popen:
    """The stand-in in its own process (so its work does not share this process's interpreter)."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve-latency", str(port), str(latency)])
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("stand-in server did not start")


def serve_latency(port: int, latency: float) -> None:
    """Answers every request after ``latency`` seconds with fixed digit log-probabilities."""
    payload = json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "4"},
                    "finish_reason": "length",
                    "logprobs": {
                        "content": [
                            {
                                "token": "4",
                                "logprob": -0.5,
                                "bytes": [52],
                                "top_logprobs": [
                                    {"token": str(d), "logprob": -1.0 - d / 10, "bytes": [48 + d]} for d in range(6)
                                ],
                            }
                        ]
                    },
                }
            ],
        }
    ).encode()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(latency)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    class Server(ThreadingHTTPServer):
        request_queue_size = 256
        daemon_threads = True

    Server(("127.0.0.1", port), H).serve_forever()


def main() -> None:
    if sys.argv[1:2] == ["--serve-latency"]:
        return serve_latency(int(sys.argv[2]), float(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--server", choices=["tiny", "latency"], default="tiny")
    ap.add_argument("--latency", type=float, default=0.1, help="seconds per request for --server latency")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=8, help="rollout samples per denoising batch (= per scoring chunk)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process (and the judge's)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    port = free_port()
    server = (
        start_tiny_server(port, args.threads) if args.server == "tiny" else start_latency_server(port, args.latency)
    )
    try:
        policy = FluxKontextPolicy(resolution=args.resolution, max_sequence_length=16, tiny=TinyFlux())
        module = EditR1Module(
            policy,
            lora=LoraSettings(rank=4, alpha=8.0),
            rollout=RolloutSettings(group_size=args.group_size, steps=args.steps, batch_size=args.chunk),
            seed=0,
        )
        ds = SceneDataset(SceneConfig(size=args.resolution), "train", length=args.groups)
        batch = collate_prompts([ds[i] for i in range(args.groups)])
        reward = ServedMLLMReward(
            base_url=f"http://127.0.0.1:{port}/v1",
            model="editr1-tiny-judge",
            prompt=SHORT,
            max_concurrency=args.concurrency,
            max_pixels=56 * 56,
        )
        ro = module.sample_groups(batch)  # warm-up, and the edits scored alone
        chunks = list(_chunks(module, batch))
        for f in [reward.submit(c) for c in chunks]:
            f.result()
        times: dict[str, list[float]] = {"rollout": [], "scoring": [], "overlapped": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            module.sample_groups(batch)
            times["rollout"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for f in [reward.submit(c) for c in chunks]:
                f.result()
            times["scoring"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            futures = []
            module.sample_groups(batch, on_chunk=lambda c: futures.append(reward.submit(c)))
            rewards = torch.cat([f.result() for f in futures])
            times["overlapped"].append(time.perf_counter() - t0)
        assert torch.isfinite(rewards).all(), reward.stats()
        best = {k: min(v) for k, v in times.items()}
        ratio = best["overlapped"] / max(best["rollout"], best["scoring"])
        n = ro.edits.shape[0]
        judge = (
            "tiny judge via editr1 serve-reward"
            if args.server == "tiny"
            else f"{args.latency * 1000:.0f} ms/request stand-in"
        )
        print(
            f"{n} edits ({args.groups} groups x {args.group_size}), chunks of {args.chunk}, {args.steps} steps at "
            f"{args.resolution}px, {judge}, {args.threads} thread(s) per process"
        )
        print(f"rollout alone   : {best['rollout']:.3f} s")
        print(f"scoring alone   : {best['scoring']:.3f} s")
        print(f"overlapped      : {best['overlapped']:.3f} s")
        print(f"sequential sum  : {best['rollout'] + best['scoring']:.3f} s")
        print(f"overlapped / max(rollout, scoring) = {ratio:.3f} (target <= 1.15)")
        reward.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _chunks(module: EditR1Module, batch: dict) -> list:
    out: list = []
    module.sample_groups(batch, on_chunk=out.append)
    return out


if __name__ == "__main__":
    main()

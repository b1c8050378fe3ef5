"""Benchmark: local MLLM judge, batched scoring vs one edit at a time (issue target: >= 3x throughput
at batch 8). Both measured in one run on the same inputs; prints judgements/s and the ratio.

    python benchmarks/reward_batching.py [--hidden 128 --layers 2 --image 64 --n 32 --repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from editr1.rewards import LocalMLLMReward, RewardInputs
from editr1.rewards.tiny_judge import TinyJudge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--image", type=int, default=56, help="image side in px (judge max_pixels = image^2)")
    ap.add_argument("--n", type=int, default=32, help="judgements per measurement")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--prompt",
        choices=["default", "short"],
        default="default",
        help="editr1's full rubric (~700 tokens with the tiny byte-level tokenizer) or a one-line prompt",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tiny = TinyJudge(
        hidden=args.hidden,
        layers=args.layers,
        vision_hidden=args.hidden,
        warmup_steps=0,
        max_pixels=args.image * args.image,
    )
    g = torch.Generator().manual_seed(0)
    x = RewardInputs(
        sources=torch.rand(args.n, 3, args.image, args.image, generator=g),
        edits=torch.rand(args.n, 3, args.image, args.image, generator=g),
        instructions=["make the red circle blue"] * args.n,
        requirements=["keep everything else"] * args.n,
    )
    prompt = None if args.prompt == "default" else "Instruction: {instruction}. Requirement: {requirement}. Score 0-5."
    batched = LocalMLLMReward(
        torch_dtype="float32", batch_size=args.batch, max_pixels=args.image**2, tiny=tiny, prompt=prompt
    ).to("cpu")
    single = LocalMLLMReward(torch_dtype="float32", batch_size=1, max_pixels=args.image**2, tiny=tiny, prompt=prompt)
    single.judge = batched.judge  # the same model: only the batching differs
    batched.score(x.select(0, args.batch))  # warm-up
    times = {"batched": [], "single": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for name, reward in (("batched", batched), ("single", single)):
            t0 = time.perf_counter()
            reward.score(x)
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    blank = Image.new("RGB", (args.image, args.image))
    tokens = batched.judge.processor(text=batched.texts(x.select(0, 1)), images=[[blank, blank]], return_tensors="pt")
    tokens = tokens["input_ids"].shape[1]
    print(
        f"judge: hidden {args.hidden}, layers {args.layers}, images {args.image}px, {args.prompt} prompt "
        f"({tokens} tokens), {args.n} judgements, {args.threads} threads"
    )
    print(f"one at a time : {args.n / best['single']:8.1f} judgements/s  ({best['single']:.2f} s)")
    print(f"batch of {args.batch:<5d}: {args.n / best['batched']:8.1f} judgements/s  ({best['batched']:.2f} s)")
    print(f"speed-up      : {best['single'] / best['batched']:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()

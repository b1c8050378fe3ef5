"""How well a tiny judge ranks the edits of one prompt, on the demo base's own rollouts.

Group-relative RL uses only the differences between the edits of one prompt, so a judge's agreement with the
scene reward across prompts says little about how it will train. This script rolls out the shipped demo base
(``prompts`` held-out scenes × ``group`` DPM-Solver++ edits, 4 steps, as the demo's rollouts), scores the edits
with the judge (logit-expected digit) and with the scene reward, and prints Spearman ρ over all edits, over the
prompts' means and within each group (mean over groups), and both within-group standard deviations.

    python benchmarks/judge_within_group.py                                # the shipped judge
    python benchmarks/judge_within_group.py --weights my_judge/model.safetensors
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main(argv: list[str] | None = None) -> None:
    from torchmetrics.functional import spearman_corrcoef

    from editr1.data.scenes import make_example
    from editr1.demo_base import DEMO_SCENES, shipped_base
    from editr1.evaluation.scenes import evaluate_scenes
    from editr1.rewards import LocalMLLMReward, RewardInputs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="asset:demo_judge/model.safetensors", help="a tiny judge's safetensors")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--start", type=int, default=1000, help="first held-out scene seed")
    p.add_argument("--seed", type=int, default=5, help="sampling seed of the rollouts")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    base = shipped_base()
    g, k = a.prompts, a.group
    res = evaluate_scenes(base, DEMO_SCENES, "heldout", g, k, 4, "dpmpp_2m", a.seed, a.start)
    rows = [make_example(i, DEMO_SCENES, "heldout") for i in range(a.start, a.start + g)]
    judge = LocalMLLMReward(tiny_weights=a.weights, torch_dtype="float32", max_pixels=DEMO_SCENES.size**2)
    x = RewardInputs(
        edits=res.edits,
        sources=res.sources.repeat_interleave(k, 0),
        instructions=[r["prompt"] for r in rows for _ in range(k)],
        requirements=[r["requirement"] for r in rows for _ in range(k)],
    )
    score, gold = judge.score(x).view(g, k).double(), res.rewards.view(g, k).double()
    within = [float(spearman_corrcoef(score[i], gold[i])) for i in range(g) if score[i].std() > 0 and gold[i].std() > 0]
    print(f"{g} held-out prompts x {k} rollouts of the demo base, judge {a.weights}")
    print(f"Spearman rho, all edits:           {float(spearman_corrcoef(score.flatten(), gold.flatten())):.3f}")
    print(f"Spearman rho, the prompts' means:  {float(spearman_corrcoef(score.mean(1), gold.mean(1))):.3f}")
    print(f"Spearman rho within a group, mean: {statistics.mean(within):.3f} ({len(within)} groups with a spread)")
    print(f"within-group std: judge {float(score.std(1).mean()):.4f}, scene reward {float(gold.std(1).mean()):.4f}")


if __name__ == "__main__":
    main()

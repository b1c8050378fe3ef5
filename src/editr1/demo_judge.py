"""Train the demo's tiny MLLM judge: a small Qwen2.5-VL that rates scene edits 0–5, on a CPU.

Real transformers classes and the real reward path: the judge sees exactly what ``LocalMLLMReward`` shows it
(``[source, edit]`` as PIL images through Qwen2.5-VL's processor, editr1's judge prompt with the instruction and
the requirement, the chat template, the first answer token). Its training answers are the 0–5 digit derived
from the verifiable scene reward ``r`` (identity scores 0.5, the exact target 1.0)::

    digit = clamp(round(10 · (r − 0.5)), 0, 5)

on a mix of edits: the shipped demo base's own rollouts (DPM-Solver++ 4 steps, as in training, and Euler 8),
the true targets, the sources unchanged, partial blends of source and target, noisy targets, wrong colours
in the edited region, brightness shifts, noisy rollouts. Everything is drawn from fixed seeds. A BPE
tokenizer (the ``tokenizers`` trainer on the judge prompts of training scenes) makes the scene words single
tokens; it is stored in the weights file's metadata. Held-out agreement with the verifiable reward (Spearman
ρ of the logit-expected score, exact-digit accuracy of the most likely digit) is measured on the scenes'
``heldout`` and ``unseen`` splits at seeds the demo's evaluations never use. Run::

    python -m editr1.demo_judge --out data/demo_judge
    python -m editr1.demo_judge --curriculum 600 --prompt "Instruction: {instruction}. Score 0-5."   # variants

``--curriculum N`` draws the first N steps from the edit kinds whose digit follows from how much and how the
image changed (identity, target, blends, noise, brightness, wrong colours); ``--prompt`` trains on another judge
prompt (saved in the file's metadata as ``prompt``, with the sizes and the tokenizer).

It writes ``model.safetensors`` (load it with ``LocalMLLMReward(tiny_weights=...)``: its sizes, tokenizer and
prompt come from the file) and ``metrics.json`` (the agreement figures, the training history and settings)
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from editr1.data.scenes import make_example
from editr1.demo_base import DEMO_SCENES, shipped_base
from editr1.evaluation.scenes import evaluate_scenes
from editr1.images import tensor_to_image
from editr1.rewards.mllm import user_turn
from editr1.rewards.prompts import DEFAULT_TEMPLATE, render
from editr1.rewards.scenes import scene_reward
from editr1.rewards.scoring import digit_token_ids, expected_score_from_logits
from editr1.rewards.tiny_judge import TinyJudge, build_tiny_judge
from editr1.seeding import derive_seed

# The shipped judge's sizes: patches of 4 px, so a 32 px scene is 8 x 8 patches (16 merged tokens per image)
# and each 10 px grid cell spans more than two patches.
DEMO_JUDGE = TinyJudge(
    hidden=96,
    layers=3,
    heads=4,
    kv_heads=2,
    vision_hidden=64,
    vision_depth=2,
    patch_size=4,
    min_pixels=32 * 32,
    max_pixels=32 * 32,
    warmup_steps=0,
)
KINDS = {  # kind of edit -> share of the training mix
    "rollout": 0.30,
    "rollout_euler": 0.10,
    "target": 0.10,
    "identity": 0.08,
    "blend": 0.14,
    "noise": 0.08,
    "wrong_colour": 0.10,
    "brightness": 0.05,
    "rollout_noise": 0.05,
}
JUDGE_PROMPT = "Instruction: {instruction}\nScore the edit from 0 to 5."  # short: 72 tokens per judgement in all
HELDOUT_START = 100_000  # held-out / unseen scene seeds for the judge's metrics (the demo evaluates 0..127)


def reward_to_digit(r: torch.Tensor) -> torch.Tensor:
    """The judge's training answer for scene reward ``r``: clamp(round(10 (r − 0.5)), 0, 5)."""
    return torch.round(10 * (r - 0.5)).clamp(0, 5).long()


@dataclass
class Example:
    source: torch.Tensor  # (3, H, W) in [0, 1]
    edit: torch.Tensor
    instruction: str
    requirement: str
    reward: float
    kind: str
    target: torch.Tensor | None = None  # the scene's true target (for the per-region training signals)


def perturb(kind: str, source: torch.Tensor, target: torch.Tensor, rollout: torch.Tensor, g: torch.Generator):
    """One edit of ``kind`` from a scene's source, true target and a policy rollout (all (3, H, W) in [0, 1])."""
    u = float(torch.rand((), generator=g))
    if kind in ("rollout", "rollout_euler"):
        return rollout
    if kind == "target":
        return target
    if kind == "identity":
        return source
    if kind == "blend":
        return source + u * (target - source)
    if kind == "noise":
        return (target + 0.3 * u * torch.randn(target.shape, generator=g)).clamp(0, 1)
    if kind == "rollout_noise":
        return (rollout + 0.2 * u * torch.randn(rollout.shape, generator=g)).clamp(0, 1)
    if kind == "brightness":
        return (target * (0.6 + 0.8 * u)).clamp(0, 1)
    if kind == "wrong_colour":  # the edited region in another colour (channels permuted)
        changed = (source - target).abs().mean(0, keepdim=True) > 0.1
        perm = [(1, 2, 0), (2, 0, 1), (1, 0, 2)][int(3 * u) % 3]
        return torch.where(changed, target[list(perm)], target)
    raise ValueError(f"unknown edit kind {kind!r}")


def make_examples(policy, split: str, start: int, count: int, seed: int, log=print) -> list[Example]:
    """``count`` scenes of ``split`` from seed ``start``: 4 rollouts each (DPM-Solver++ 4 steps) and 1 Euler edit;
    each scene gives 4 examples whose kinds follow :data:`KINDS`."""
    t0 = time.perf_counter()
    fast = evaluate_scenes(policy, DEMO_SCENES, split, count, 4, 4, "dpmpp_2m", seed, start)
    euler = evaluate_scenes(policy, DEMO_SCENES, split, count, 1, 8, "euler", seed + 1, start)
    log(f"{split}: {count} scenes, {5 * count} base edits in {time.perf_counter() - t0:.0f}s")
    g = torch.Generator().manual_seed(derive_seed(seed, 31, start))
    kinds, shares = list(KINDS), torch.tensor(list(KINDS.values()))
    out = []
    for i in range(count):
        ex = make_example(start + i, DEMO_SCENES, split)
        source = fast.sources[i]
        target = policy.preprocess([ex["target"]])[0].cpu()
        for k in range(4):
            kind = kinds[int(torch.multinomial(shares, 1, generator=g))]
            rollout = euler.edits[i] if kind == "rollout_euler" else fast.edits[4 * i + k]
            edit = perturb(kind, source, target, rollout, g).float()
            r = float(scene_reward(edit[None], target[None], source[None])[0])
            out.append(Example(source, edit, ex["prompt"], ex["requirement"], r, kind, target))
    return out


def cached(folder: Path | None, name: str, make, log=print) -> list[Example]:
    """``make()``'s examples, saved to / read back from ``folder/name.pt`` when a folder is given (plain tensors
    and strings, read with ``weights_only=True``), so variants of the judge train on the same examples."""
    if folder is None:
        return make()
    path = Path(folder) / f"{name}.pt"
    if path.exists():
        log(f"examples from {path}")
        return [Example(**d) for d in torch.load(path, weights_only=True)]
    examples = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    # clones: an example's tensors are views of whole batches, which would be saved whole
    rows = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(e).items()} for e in examples]
    torch.save(rows, path)
    return examples


def train_tokenizer(vocab_size: int = 700, scenes: int = 3000, template: str = DEFAULT_TEMPLATE) -> dict:
    """BPE vocab and merges learned from the judge prompts of training scenes (every byte kept)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = []
    for s in range(scenes):
        ex = make_example(s, DEMO_SCENES, "train")
        corpus.append(render(template, ex["prompt"], ex["requirement"]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    return {"vocab": model["vocab"], "merges": merges}


class Batcher:
    """Examples -> the processor's tensors, as the reward path builds them (``template``: the judge prompt)."""

    def __init__(self, processor, template: str = DEFAULT_TEMPLATE) -> None:
        self.processor = processor
        self.template = template
        processor.tokenizer.padding_side = "left"

    def texts(self, examples: list[Example]) -> list[str]:
        return [
            self.processor.apply_chat_template(
                user_turn(render(self.template, e.instruction, e.requirement)),
                add_generation_prompt=True,
                tokenize=False,
            )
            for e in examples
        ]

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        images = [[tensor_to_image(e.source), tensor_to_image(e.edit)] for e in examples]
        return self.processor(text=self.texts(examples), images=images, return_tensors="pt", padding=True)


@torch.no_grad()
def agreement(model, batcher: Batcher, examples: list[Example], batch: int = 64) -> dict:
    """Spearman ρ (logit-expected score vs scene reward), exact-digit accuracy, per-kind ρ for rollouts."""
    from torchmetrics.functional import spearman_corrcoef

    model.eval()
    digits = digit_token_ids(batcher.processor.tokenizer)
    scores, argmax = [], []
    for s in range(0, len(examples), batch):
        logits = model(**batcher(examples[s : s + batch]), logits_to_keep=1).logits[:, -1, :].float()
        scores.append(expected_score_from_logits(logits, digits))
        argmax.append(logits[:, digits].argmax(-1))
    score, pred = torch.cat(scores), torch.cat(argmax)
    reward = torch.tensor([e.reward for e in examples])
    label = reward_to_digit(reward)
    rollouts = torch.tensor([e.kind.startswith("rollout") for e in examples])

    def rho(mask):
        return float(spearman_corrcoef(score[mask], reward[mask])) if int(mask.sum()) > 2 else math.nan

    return {
        "n": len(examples),
        "spearman": rho(torch.ones_like(rollouts)),
        "exact_digit_accuracy": float((pred == label).float().mean()),
        "within_one_accuracy": float(((pred - label).abs() <= 1).float().mean()),
        "spearman_rollouts": rho(rollouts),
        "label_counts": torch.bincount(label, minlength=6).tolist(),
    }


EASY_KINDS = ("identity", "target", "blend", "noise", "brightness", "wrong_colour")  # judged without the policy


def train(
    out: Path,
    steps: int,
    scenes: int,
    batch: int,
    lr: float,
    seed: int,
    eval_scenes: int,
    log=print,
    curriculum: int = 0,
    prompt: str | None = None,
    cache: Path | None = None,
) -> dict:
    """Train and save the judge; the first ``curriculum`` steps draw only :data:`EASY_KINDS` (edits whose digit
    follows from how much and how the image changed), so the vision tower learns to compare the two images before
    the harder rollouts. ``prompt``: the judge prompt it is trained on (default: :data:`JUDGE_PROMPT`)."""

    template = prompt or JUDGE_PROMPT

    start = time.perf_counter()
    torch.manual_seed(seed)
    spec = train_tokenizer(template=template)
    base = shipped_base()
    data = cached(cache, f"train-{scenes}-{seed}", lambda: make_examples(base, "train", 0, scenes, seed, log), log)
    held = {
        split: cached(
            cache,
            f"{split}-{eval_scenes}-{seed}",
            lambda split=split: make_examples(base, split, HELDOUT_START, eval_scenes, seed + 7, log),
            log,
        )
        for split in ("heldout", "unseen")
    }
    # the judge: built at its sizes with the trained tokenizer (saved with the weights at the end)
    cfg = TinyJudge(**{**asdict(DEMO_JUDGE), "seed": seed})
    model, processor = build_tiny_judge(cfg, tokenizer=spec)
    batcher = Batcher(processor, template)
    easy = [e for e in data if e.kind in EASY_KINDS]
    digits = torch.tensor(digit_token_ids(processor.tokenizer))
    tokens = batcher(data[:1])["input_ids"].shape[1]
    log(f"judge: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {tokens} tokens per judgement")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warmup if k < warmup else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * k / steps))
    )
    rng = random.Random(seed)
    history = []
    model.train()
    for step in range(steps):
        examples = rng.sample(easy if step < curriculum else data, batch)
        labels = digits[reward_to_digit(torch.tensor([e.reward for e in examples]))]
        logits = model(**batcher(examples), logits_to_keep=1).logits[:, -1, :]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"judge step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s")
        if (step + 1) % 500 == 0 or step == steps - 1:
            m = agreement(model, batcher, held["heldout"][:256])
            history.append({"step": step + 1, **m})
            log(f"  heldout rho {m['spearman']:.3f} exact {m['exact_digit_accuracy']:.3f}")
            model.train()
    metrics = {split: agreement(model, batcher, ex) for split, ex in held.items()}
    metrics.update(
        steps=steps,
        train_scenes=scenes,
        train_examples=len(data),
        batch=batch,
        lr=lr,
        seed=seed,
        curriculum=curriculum,
        prompt=template,
        seconds=time.perf_counter() - start,
        history=history,
        sizes=asdict(cfg),
        train_kinds={k: sum(e.kind == k for e in data) for k in KINDS},
        torch=torch.__version__,
    )
    save(model, spec, cfg, out / "model.safetensors", template)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def save(model, spec: dict, cfg: TinyJudge, path: Path, prompt: str | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"tokenizer": json.dumps(spec), "sizes": json.dumps({**asdict(cfg), "weights": None})}
    if prompt is not None:
        meta["prompt"] = prompt  # the judge prompt it was trained on
    save_file(state, str(path), metadata=meta)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/demo_judge", help="folder for model.safetensors and metrics.json")
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--scenes", type=int, default=2048, help="training scenes (4 examples each)")
    p.add_argument("--eval-scenes", type=int, default=256, help="held-out and unseen scenes (4 examples each)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curriculum", type=int, default=0, help="first steps on the easy edit kinds only")
    p.add_argument("--prompt", default=None, help="judge prompt template (default: JUDGE_PROMPT)")
    p.add_argument("--cache", default=None, help="folder to keep the generated examples in (reused when present)")
    args = p.parse_args(argv)
    metrics = train(
        Path(args.out),
        args.steps,
        args.scenes,
        args.batch,
        args.lr,
        args.seed,
        args.eval_scenes,
        curriculum=args.curriculum,
        prompt=args.prompt,
        cache=Path(args.cache) if args.cache else None,
    )
    for split in ("heldout", "unseen"):
        m = metrics[split]
        print(
            f"{split}: Spearman rho {m['spearman']:.3f} (rollouts only {m['spearman_rollouts']:.3f}), "
            f"exact digit {m['exact_digit_accuracy']:.3f}, within one {m['within_one_accuracy']:.3f}"
        )
    print(f"wrote {Path(args.out) / 'model.safetensors'} and metrics.json in {metrics['seconds']:.0f}s")


if __name__ == "__main__":
    sys.exit(main())

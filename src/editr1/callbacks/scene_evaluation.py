"""Held-out synthetic scenes before and after training: the demo's evidence."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from editr1.callbacks.tensorboard import add_image, add_scalars, log_step
from editr1.data.scenes import SceneConfig
from editr1.evaluation.scenes import evaluate_scenes
from editr1.visualize import captioned_grid

log = logging.getLogger(__name__)


class SceneEvaluation(Callback):
    """Before and after training, edit held-out synthetic scenes and score them against their known
    targets (fixed seeds, a deterministic solver): the evidence that training helped.

    Prints a table at the end of ``fit``, logs ``eval/<split>/{identity,ceiling,before,after}`` and
    per-task means to TensorBoard with image grids (source | K edits, reward under each), and writes
    ``scene_eval.json`` to the run folder. ``before`` is measured when this ``fit`` call starts.

    Args:
        scenes: the scene generator; ``None`` takes the datamodule's (so held-out pairs match training).
        splits: ``heldout`` (the training grammar, other random stream) and/or ``unseen`` (shape/colour
            pairs never trained on; needs ``holdout`` pairs in the scene config).
        count: prompts per split (seeds ``[0, count)`` of the split).
        group_size: edits per prompt.
        steps: solver steps.
        solver: ``euler`` or ``dpmpp_2m``.
        seed: base of the sampling seeds (fixed across runs).
        adapter: which policy edits at the end (``default`` = θ, ``ema``).
        image_rows: prompts shown in each grid.
    """

    def __init__(
        self,
        scenes: SceneConfig | None = None,
        splits: list[str] = ["heldout", "unseen"],  # noqa: B006 - jsonargparse shows list defaults
        count: int = 64,
        group_size: int = 4,
        steps: int = 8,
        solver: str = "euler",
        seed: int = 0,
        adapter: str = "default",
        image_rows: int = 8,
    ) -> None:
        unknown = set(splits) - {"heldout", "unseen"}
        if unknown:
            raise ValueError(f"SceneEvaluation splits must be 'heldout' and/or 'unseen', got {sorted(unknown)}")
        self.scenes = scenes
        self.splits = list(splits)
        self.count = count
        self.group_size = group_size
        self.steps = steps
        self.solver = solver
        self.seed = seed
        self.adapter = adapter
        self.image_rows = image_rows
        self.results: dict[str, dict[str, dict[str, float]]] = {}

    def _scenes(self, trainer) -> SceneConfig:
        if self.scenes is not None:
            return self.scenes
        scenes = getattr(trainer.datamodule, "scenes", None)
        if scenes is None:
            raise ValueError("SceneEvaluation needs `scenes` (the datamodule has none)")
        return scenes

    def _run(self, trainer, pl_module, when: str) -> None:
        scenes = self._scenes(trainer)
        adapter = {"default": "default", "ema": "ema", "old": "old", "reference": None}[self.adapter]
        out = {}
        for split in self.splits:
            if split == "unseen" and not scenes.holdout:
                log.info("SceneEvaluation: no held-out shape/colour pairs, skipping the unseen split")
                continue
            with pl_module.policy.adapter(adapter):
                res = evaluate_scenes(
                    pl_module.policy, scenes, split, self.count, self.group_size, self.steps, self.solver, self.seed
                )
            out[split] = res.summary()
            step = log_step(trainer)  # the axis of the training scalars (batches, skipped ones included)
            scalars = {f"eval/{split}/{when}": res.mean}
            scalars.update({f"eval/{split}/{k}": out[split][k] for k in ("identity", "ceiling")})
            scalars.update({f"eval/{split}/{when}/{k}": v for k, v in out[split].items() if k.startswith("task/")})
            add_scalars(trainer, scalars, step)
            rows, caps = [], []
            k = self.group_size
            for i in range(min(self.image_rows, self.count)):
                rows.append([res.sources[i]] + [res.edits[i * k + j] for j in range(k)])
                caps.append(["source"] + [f"{float(res.rewards[i, j]):.3f}" for j in range(k)])
            add_image(trainer, f"eval/{split}/{when}", captioned_grid(rows, caps), step)
        self.results[when] = out

    def on_train_start(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "before")

    def on_train_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "after")
        if not trainer.is_global_zero:
            return
        print(self.table(), flush=True)
        if trainer.log_dir:
            path = Path(trainer.log_dir) / "scene_eval.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"steps": trainer.global_step, **self.results}, indent=2) + "\n")

    def table(self) -> str:
        lines = [
            f"Held-out scenes: {self.count} prompts x {self.group_size} edits, {self.solver} {self.steps} steps, "
            "fixed seeds",
            f"{'split':<8} {'identity':>8} {'ceiling':>8} {'before':>8} {'after':>8} {'change':>8}",
        ]
        for split in self.splits:
            b = self.results.get("before", {}).get(split)
            a = self.results.get("after", {}).get(split)
            if b is None or a is None:
                continue
            lines.append(
                f"{split:<8} {a['identity']:8.3f} {a['ceiling']:8.3f} {b['mean']:8.3f} {a['mean']:8.3f} "
                f"{a['mean'] - b['mean']:+8.3f}"
            )
        return "\n".join(lines)

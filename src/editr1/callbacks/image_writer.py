"""``editr1 predict``: each edit as a PNG and a line of ``predictions.jsonl``."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from editr1.images import tensor_to_image


class ImageWriter(BasePredictionWriter):
    """``editr1 predict`` writes each edit as ``<output_dir>/<name>.png`` (the key's readable part and a hash
    of it, see :func:`safe_name`) and, at the end, one ``predictions.jsonl`` line per edit (key, instruction,
    file), then prints where it wrote and how many. The module adds one when no config does, so a trainer
    config that replaces the callback list cannot silence ``predict``.

    Args:
        output_dir: the folder; ``null`` = ``<run folder>/predictions``.
    """

    def __init__(self, output_dir: str | None = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.written = 0

    def _folder(self, trainer) -> Path:
        if self.output_dir is None:
            self.output_dir = Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
        return self.output_dir

    def on_predict_start(self, trainer, pl_module) -> None:
        self.written = 0
        folder = self._folder(trainer)
        (folder / f"predictions.rank{trainer.global_rank}.jsonl").unlink(missing_ok=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        folder = self._folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, key in enumerate(prediction["keys"]):
            if prediction["meta"][i].get("padding"):
                continue
            name = safe_name(key) + ".png"
            tensor_to_image(prediction["edits"][i], clamp=False).save(folder / name)
            lines.append({"key": key, "prompt": prediction["prompts"][i], "file": name})
        self.written += len(lines)
        with (folder / f"predictions.rank{trainer.global_rank}.jsonl").open("a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        from editr1.training import distributed

        folder = self._folder(trainer)
        total = int(distributed.reduce(self.written, world=trainer.world_size, device=pl_module.device))
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return
        lines = []
        for f in sorted(folder.glob("predictions.rank*.jsonl")):
            lines.extend(x for x in f.read_text(encoding="utf-8").splitlines() if x.strip())
            f.unlink()
        if total == 0:
            print(f"predict: no edit was written (the prediction set had no readable row); folder {folder}")
            return
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "predictions.jsonl").write_text("".join(line + "\n" for line in sorted(lines)), encoding="utf-8")
        print(f"predict: wrote {total} edits to {folder} (PNGs and predictions.jsonl)")


def safe_name(key: str) -> str:
    """A file name for a key: its readable part plus a hash of the whole key, so two keys never
    overwrite each other's files."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:120] or "edit"
    return f"{name}-{zlib.crc32(key.encode('utf-8')):08x}"

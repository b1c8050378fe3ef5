"""``editr1 predict``: each edit as a PNG and a line of ``predictions.jsonl``."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from editr1.images import tensor_to_image


class ImageWriter(BasePredictionWriter):
    """``editr1 predict`` writes each edit as ``<output_dir>/<key>.png`` and a line of
    ``predictions.jsonl`` (key, instruction, file, reward when a reward model scored it)."""

    def __init__(self, output_dir: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, key in enumerate(prediction["keys"]):
            if prediction["meta"][i].get("padding"):
                continue
            name = safe_name(key) + ".png"
            tensor_to_image(prediction["edits"][i], clamp=False).save(self.output_dir / name)
            lines.append({"key": key, "prompt": prediction["prompts"][i], "file": name})
        with (self.output_dir / f"predictions.rank{trainer.global_rank}.jsonl").open("a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


def safe_name(key: str) -> str:
    """A file name for a key: its readable part plus a hash of the whole key, so two keys never
    overwrite each other's files."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:120] or "edit"
    return f"{name}-{zlib.crc32(key.encode('utf-8')):08x}"

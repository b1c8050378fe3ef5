"""Instruction–image pairs from a UniWorld-format folder.

A folder holds ``images/`` and ``train_metadata.jsonl``, one JSON object a line::

    {"prompt": "make the sky purple", "image": "images/0001.png", "requirement": "keep the buildings"}

with optional ``"target"`` (an image path, for supervised warm-up) and ``"task"`` (a category).
``"image"`` may be a list of paths for models that edit from several images: the first is the image
being edited, the others are references in order ("picture 2", "picture 3", …)::

    {"prompt": "put the cat from picture 2 on the sofa", "image": ["images/sofa.png", "images/cat.png"]}

Every path is checked alike; a row with a bad reference is skipped and counted (``reference_*`` reasons).
An optional ``"mask"`` is the path of a greyscale image of the source's size, white where the edit is meant to
change it (for rewards that look at the region, e.g. a preservation reward measured outside it); it is checked
like the images (``mask_*`` reasons, ``mask_size_mismatch`` when its size is not the source's).
Bad rows are skipped and counted with their reason; a folder with no usable row is an error before
training starts. Images are read lazily; one that cannot be read is skipped and counted too. A path the
OS refuses (a NUL byte, an over-long name, a symlink loop) is a skipped row like any other; images are
turned upright as their EXIF orientation says (phone photos); a byte-order mark before the first row is
read past.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps
from torch.utils.data import Dataset

from editr1.images import ImageTooLarge, decode_image, to_rgb

log = logging.getLogger(__name__)

MAX_INSTRUCTION_CHARS = 2000
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # decompression-bomb guard: 64 megapixels
MAX_IMAGES_PER_ROW = 7  # the edited image and up to 6 references (+ the edit: a served judge's 8 images)


@dataclass(frozen=True)
class EditRecord:
    prompt: str
    image: Path
    requirement: str = ""
    target: Path | None = None
    task: str = ""
    references: tuple[Path, ...] = ()  # further input images, in order (picture 2, 3, …)
    mask: Path | None = None  # greyscale, the source's size: white = the region to edit

    @property
    def key(self) -> str:
        """Groups are keyed by (every input image, instruction), not by instruction text alone."""
        return "+".join(p.as_posix() for p in (self.image, *self.references)) + f"::{self.prompt}"


def parse_line(line: str, root: Path) -> EditRecord | str:
    """An :class:`EditRecord`, or the reason the line is skipped."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return "malformed_json"
    if not isinstance(obj, dict):
        return "not_an_object"
    prompt, reason = check_prompt(obj.get("prompt"))
    if reason:
        return reason
    image = obj.get("image")
    images = image if isinstance(image, list) else [image]
    if isinstance(image, list) and not image:
        return "missing_image_field"
    if len(images) > MAX_IMAGES_PER_ROW:
        return "too_many_images"
    paths = []
    for n, rel in enumerate(images):
        role = "image" if n == 0 else "reference"
        if not isinstance(rel, str) or not rel.strip():
            return f"missing_{role}_field"
        path = locate(root, rel)
        if isinstance(path, str):
            return {"outside_folder": f"{role}_outside_folder", "missing_file": f"missing_{role}_file"}.get(
                path, f"{role}_{path}"
            )
        paths.append(path)
    image_path, references = paths[0], tuple(paths[1:])
    requirement = obj.get("requirement", "")
    if requirement is None:
        requirement = ""
    if not isinstance(requirement, str):
        return "bad_requirement"
    target_path = None
    if obj.get("target") is not None:
        if not isinstance(obj["target"], str):
            return "bad_target"
        target_path = locate(root, obj["target"])
        if target_path in ("outside_folder", "missing_file"):
            return "missing_target_file"
        if isinstance(target_path, str):
            return "target_" + target_path
    mask_path = None
    if obj.get("mask") is not None:
        if not isinstance(obj["mask"], str) or not obj["mask"].strip():
            return "bad_mask"
        mask_path = locate(root, obj["mask"])
        if isinstance(mask_path, str):
            return {"outside_folder": "mask_outside_folder", "missing_file": "missing_mask_file"}.get(
                mask_path, f"mask_{mask_path}"
            )
    task = obj.get("task", "")
    task = str(task) if task is not None else ""
    return EditRecord(prompt, image_path, requirement.strip(), target_path, task, references, mask_path)


def check_prompt(prompt) -> tuple[str, str | None]:
    """``(stripped instruction, None)``, or ``("", reason)`` when it is unusable."""
    if not isinstance(prompt, str):
        return "", "missing_prompt"
    prompt = prompt.strip()
    if not prompt:
        return "", "empty_prompt"
    if len(prompt) > MAX_INSTRUCTION_CHARS:
        return "", "overlong_prompt"
    return prompt, None


def resolve_inside(root: Path, rel: str) -> Path | str:
    """``root / rel`` with its symlinks resolved, or why that path cannot be used: ``outside_folder``
    (it leads out of ``root``), ``path_nul_byte``, ``path_too_long``, ``symlink_loop`` or ``unreadable_path``
    (the OS refused it otherwise). Whether the file exists is not checked (see :func:`locate`)."""
    if "\x00" in rel:
        return "path_nul_byte"
    try:  # realpath, unlike Path.resolve on Python < 3.13, does not raise on symlink loops
        path, base = Path(os.path.realpath(root / rel)), Path(os.path.realpath(root))
    except (OSError, ValueError, RuntimeError):
        return "unreadable_path"
    if not path.is_relative_to(base):
        return "outside_folder"
    return path


_STAT_ERRORS = {errno.ELOOP: "symlink_loop", errno.ENAMETOOLONG: "path_too_long"}


def locate(root: Path, rel: str) -> Path | str:
    """The regular file ``root / rel`` (symlinks resolved), or why not: a :func:`resolve_inside` or a
    :func:`check_file` reason."""
    path = resolve_inside(root, rel)
    return path if isinstance(path, str) else check_file(path)


def check_file(path: Path) -> Path | str:
    """``path`` when it is a regular file (symlinks followed), or why not: ``missing_file`` (absent, or not a
    regular file), ``symlink_loop``, ``path_too_long`` or ``unreadable_path``."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "missing_file"
        return _STAT_ERRORS.get(exc.errno, "unreadable_path")
    except ValueError:  # a NUL byte
        return "path_nul_byte"
    return path if stat.S_ISREG(mode) else "missing_file"


def read_metadata(folder: str | Path, filename: str = "train_metadata.jsonl") -> tuple[list[EditRecord], Counter]:
    """All usable records of a folder and a count of skipped lines by reason.

    Raises ``FileNotFoundError`` / ``ValueError`` when the folder as a whole is unusable.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    meta = root / filename
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: a data folder needs images/ and {filename}")
    records: list[EditRecord] = []
    skipped: Counter = Counter()
    with meta.open("r", encoding="utf-8-sig", errors="replace") as f:  # a leading BOM is not row text
        for line in f:
            if not line.strip():
                continue
            rec = parse_line(line, root)
            if isinstance(rec, str):
                skipped[rec] += 1
            else:
                records.append(rec)
    if skipped:
        log.warning(
            "%s: skipped %d of %d rows: %s",
            meta,
            sum(skipped.values()),
            len(records) + sum(skipped.values()),
            dict(skipped),
        )
    if not records:
        raise ValueError(f"{meta} has no usable row (skipped: {dict(skipped) or 'file is empty'})")
    return records, skipped


def load_image(source: Path | bytes) -> Image.Image | str:
    """An RGB image from a file or from encoded bytes, upright as its EXIF orientation says (phone photos),
    or the reason it cannot be used."""
    try:
        return decode_image(source, MAX_IMAGE_PIXELS, convert=_upright_rgb)
    except ImageTooLarge:
        return "image_too_large"
    except FileNotFoundError:
        return "missing_image_file"
    except (OSError, ValueError, SyntaxError):
        return "unreadable_image"


def load_mask(source: Path | bytes, image: Image.Image) -> Image.Image | str:
    """The greyscale (``L``, the luminance of what :func:`load_image` reads) edit mask of ``image`` from a file or
    encoded bytes, upright as its EXIF orientation says, or the reason it cannot be used: ``mask_`` + a
    :func:`load_image` reason, or ``mask_size_mismatch`` when it is not the image's size."""
    mask = load_image(source)
    if isinstance(mask, str):
        return "mask_" + mask
    if mask.size != image.size:
        return "mask_size_mismatch"
    return mask.convert("L")


def _upright_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, then RGB; the pixel limit holds for the turned image too."""
    img = ImageOps.exif_transpose(img)
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"image of {img.width}x{img.height} exceeds {MAX_IMAGE_PIXELS} pixels")
    return to_rgb(img)


class JsonlEditDataset(Dataset):
    """Map-style dataset over a UniWorld-format folder. An unreadable image yields
    ``{"skipped": reason}``, which the collate function drops and counts."""

    def __init__(
        self,
        folder: str | Path,
        filename: str = "train_metadata.jsonl",
        load_targets: bool = True,
        require_targets: bool = False,
        skip_references: bool = False,
    ) -> None:
        self.records, self.skipped_rows = read_metadata(folder, filename)
        if skip_references:  # a single-image model on data with multi-image rows: those are counted, not used
            multi = self.multi_image_rows()
            if multi:
                self.skipped_rows["multi_image_row"] += multi
                self.records = [r for r in self.records if not r.references]
                log.warning("%s: %d rows with reference images are skipped (data.references: skip)", folder, multi)
            if not self.records:
                raise ValueError(f"{folder}: data.references is 'skip' but every row has reference images")
        if require_targets:  # only the rows with a target (supervised training); the others are counted
            without = sum(r.target is None for r in self.records)
            if without:
                self.skipped_rows["missing_target"] += without
                self.records = [r for r in self.records if r.target is not None]
                log.warning("%s: %d rows have no target and are skipped (data.targets: require)", folder, without)
            if not self.records:
                raise ValueError(f"{folder}: data.targets is 'require' but no row has a usable `target`")
        self.load_targets = load_targets or require_targets

    def __len__(self) -> int:
        return len(self.records)

    def targets_present(self) -> tuple[int, int]:
        """(rows with a target, rows)."""
        return sum(r.target is not None for r in self.records), len(self.records)

    def multi_image_rows(self) -> int:
        """Rows with at least one reference image besides the image being edited."""
        return sum(bool(r.references) for r in self.records)

    def image_sizes(self) -> list[tuple[int, int] | None]:
        """Each row's edited image ``(height, width)``, upright, from its header (nothing decoded); ``None``
        where the header cannot be read (that row is skipped and counted when it is loaded). Read once, then
        kept."""
        from editr1.data.buckets import image_size

        if getattr(self, "_sizes", None) is None or len(self._sizes) != len(self.records):
            sizes: list[tuple[int, int] | None] = []
            for rec in self.records:
                try:
                    sizes.append(image_size(rec.image))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                    sizes.append(None)
            self._sizes = sizes
        return list(self._sizes)

    def tasks(self) -> list[str]:
        """Each row's ``task`` (its category in evaluations)."""
        return [r.task for r in self.records]

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = load_image(rec.image)
        if isinstance(image, str):
            return {"skipped": image, "key": rec.key, "task": rec.task}
        references = []
        for path in rec.references:
            ref = load_image(path)
            if isinstance(ref, str):  # e.g. reference_unreadable_image, reference_image_too_large
                return {"skipped": "reference_" + ref, "key": rec.key, "task": rec.task}
            references.append(ref)
        target = None
        if self.load_targets and rec.target is not None:
            target = load_image(rec.target)
            if isinstance(target, str):
                return {"skipped": "target_" + target}
        mask = None
        if rec.mask is not None:
            mask = load_mask(rec.mask, image)
            if isinstance(mask, str):
                return {"skipped": mask, "key": rec.key, "task": rec.task}
        return {
            "image": image,
            "prompt": rec.prompt,
            "requirement": rec.requirement,
            "target": target,
            "task": rec.task,
            "key": rec.key,
            "references": references,
            "mask": mask,
        }

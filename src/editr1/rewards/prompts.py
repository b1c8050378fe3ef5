"""The judge's prompt: our own wording, with the instruction and the per-sample requirement.

A template is a string with ``{instruction}`` and ``{requirement}`` fields, given inline or read from a
file. It follows the text of one user turn that shows the source image, then the edited image.
"""

from __future__ import annotations

import string
from pathlib import Path

DEFAULT_TEMPLATE = """You are checking an image edit. The first image is the original. The second image is \
meant to be the original after carrying out this instruction:

Instruction: {instruction}
Requirements: {requirement}

Rate the edited image from 0 to 5:
0 - the wrong thing was changed, or the instruction was not carried out at all;
1 - a faint or mostly wrong attempt;
2 - partly carried out, with clear mistakes;
3 - carried out, but the requirements are not fully met or the image has visible flaws;
4 - carried out well, with small flaws;
5 - carried out exactly, every requirement met, and the image is clean and natural.
Answer with the number only."""

NO_REQUIREMENT = "none beyond the instruction"

# Rows with reference images: the images come as picture 1 (the one edited), the references (picture 2, …),
# then the edit; this names them before the template's text (which calls the edit "the second image").
MULTI_IMAGE_PREAMBLE = (
    "This edit was made from {inputs} input images, shown first in order: picture 1 (the original, the "
    "image being edited){references}. The last image shown is the edited result; in the text below, "
    '"the first image" means picture 1 and "the second image" means the edited result.\n\n'
)


def load_template(template: str | None = None, template_file: str | None = None) -> str:
    """The template to use: ``template`` or the contents of ``template_file`` (not both), else ours."""
    if template is not None and template_file is not None:
        raise ValueError("give the judge prompt either inline (prompt) or as a file (prompt_file), not both")
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise FileNotFoundError(f"judge prompt file {path} not found")
        template = path.read_text(encoding="utf-8")
    template = DEFAULT_TEMPLATE if template is None else template
    check_template(template)
    return template


def check_template(template: str) -> None:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = fields - {"instruction", "requirement"}
    if unknown:
        raise ValueError(f"judge prompt has unknown fields {sorted(unknown)}; use {{instruction}} and {{requirement}}")
    if "instruction" not in fields:
        raise ValueError("judge prompt must contain {instruction}")


def render(template: str, instruction: str, requirement: str, references: int = 0) -> str:
    """The judge's text; with ``references`` > 0 reference images, a preamble names every image first."""
    text = template.format(instruction=instruction.strip(), requirement=requirement.strip() or NO_REQUIREMENT)
    if references <= 0:
        return text
    named = "".join(f", picture {k} (a reference)" for k in range(2, references + 2))
    return MULTI_IMAGE_PREAMBLE.format(inputs=references + 1, references=named) + text

"""The judge prompt: rendering and template checks beyond test_reward_scoring.py's basics."""

from __future__ import annotations

import pytest

from editr1.rewards.prompts import DEFAULT_TEMPLATE, NO_REQUIREMENT, check_template, load_template, render


def test_the_default_template_has_both_fields_and_asks_for_a_digit():
    check_template(DEFAULT_TEMPLATE)
    assert DEFAULT_TEMPLATE.count("{instruction}") == 1 and DEFAULT_TEMPLATE.count("{requirement}") == 1
    assert DEFAULT_TEMPLATE.rstrip().endswith("Answer with the number only.")
    assert all(f"{d} - " in DEFAULT_TEMPLATE for d in range(6))


@pytest.mark.parametrize(
    ("requirement", "shown"), [("", NO_REQUIREMENT), ("  \n\t", NO_REQUIREMENT), (" keep the sky ", "keep the sky")]
)
def test_requirements_are_stripped_and_a_blank_one_reads_as_none(requirement, shown):
    assert render("{instruction}|{requirement}", "\n recolor it \t", requirement) == f"recolor it|{shown}"


def test_values_with_braces_are_inserted_literally():
    out = render("I: {instruction} R: {requirement}", "write {requirement} on it", "{0}")
    assert out == "I: write {requirement} on it R: {0}"


def test_a_template_may_leave_out_the_requirement_and_use_each_field_twice():
    t = load_template("Do: {instruction}. Again: {instruction}.")
    assert render(t, "x", "ignored") == "Do: x. Again: x."


def test_escaped_braces_and_conversions_are_fine():
    t = load_template('Answer as JSON {{"score": n}} for {instruction!r}')
    assert render(t, "make it red", "") == "Answer as JSON {\"score\": n} for 'make it red'"


@pytest.mark.parametrize(
    "template", ["{} {instruction}", "{0} {instruction}", "{instruction.upper} x", "{instruction[0]}"]
)
def test_positional_or_attribute_fields_are_unknown_fields(template):
    with pytest.raises(ValueError, match="unknown fields"):
        check_template(template)


def test_malformed_braces_are_a_value_error():
    with pytest.raises(ValueError):
        check_template("{instruction")


def test_a_template_file_is_read_as_utf8_and_checked(tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("Consigne : {instruction} — exigences : {requirement}", encoding="utf-8")
    assert render(load_template(template_file=str(f)), "é", "") == f"Consigne : é — exigences : {NO_REQUIREMENT}"
    f.write_text("rate {edit}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown fields \['edit'\]"):
        load_template(template_file=str(f))
    with pytest.raises(FileNotFoundError, match="judge prompt file"):
        load_template(template_file=str(tmp_path))  # a folder is not a prompt file


def test_a_row_with_references_names_every_image_before_the_template():
    text = render("Instruction: {instruction}. Requirement: {requirement}.", " put the cat on the sofa ", "", 2)
    assert text == (
        "This edit was made from 3 input images, shown first in order: picture 1 (the original, the image being "
        "edited), picture 2 (a reference), picture 3 (a reference). The last image shown is the edited result; in "
        'the text below, "the first image" means picture 1 and "the second image" means the edited result.\n\n'
        "Instruction: put the cat on the sofa. Requirement: none beyond the instruction."
    )
    assert render("{instruction}", "x", "", 0) == "x"  # single-image rows: the template alone, as before


def test_judge_images_show_the_source_its_references_then_the_edit():
    import torch
    from PIL import Image

    from editr1.rewards import RewardInputs
    from editr1.rewards.mllm import judge_images, reference_counts

    ref = Image.new("RGB", (40, 20), (0, 200, 0))
    x = RewardInputs(
        torch.zeros(3, 3, 8, 8),
        torch.ones(3, 3, 8, 8),
        ["a", "a", "b"],
        ["", "", ""],
        source_ids=[0, 0, 1],
        references=[[ref, torch.full((3, 4, 4), 0.5)], [ref, torch.full((3, 4, 4), 0.5)], []],
    )
    images = judge_images(x, max_pixels=16 * 16)
    assert [len(im) for im in images] == [4, 4, 2] and reference_counts(x) == [2, 2, 0]
    assert images[0][1].size == (22, 11) and images[0][1].getpixel((0, 0)) == (0, 200, 0)  # pixels limited
    assert images[0][2].getpixel((0, 0)) == (127, 127, 127) and images[0][3].getpixel((0, 0)) == (255, 255, 255)
    assert images[0][1] is images[1][1]  # a group's source and references are converted once
    assert x.select(1, 3).references == x.references[1:3]
    with pytest.raises(ValueError, match="3 edits but 1 reference lists"):
        RewardInputs(x.sources, x.edits, x.instructions, x.requirements, references=[[]])

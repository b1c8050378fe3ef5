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

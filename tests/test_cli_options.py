"""The two helpers of function_cli (editr1.cli_options): dashed option spellings and docstring descriptions."""

from __future__ import annotations

from editr1.cli_options import docstring_description, underscored


def test_dashed_options_of_known_parameters_become_underscored():
    names = {"vae_steps", "out_dir"}
    args = ["--vae-steps", "3", "--out-dir=x", "--other-option", "1", "--", "--vae-steps"]
    assert underscored(args, names) == ["--vae_steps", "3", "--out_dir=x", "--other-option", "1", "--", "--vae-steps"]
    assert underscored(["--vae_steps", "3"], names) == ["--vae_steps", "3"]


def test_description_is_the_docstring_before_its_args():
    def command(x: int) -> None:
        """Do a thing.

        In detail.

        Args:
            x: a number.
        """

    def bare(x: int) -> None:
        pass

    assert docstring_description(command) == "Do a thing.\n\nIn detail."
    assert docstring_description(bare) is None

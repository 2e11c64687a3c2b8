"""Help texts say what the options do: -m is --model everywhere, choices are listed,
on/off flags show no `<bool>` value, no option is mentioned that a command lacks."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from pixeldefend.cli import app

# commands whose options are declared with the shared types in cli/common.py
COMMANDS = [["attack"], ["purify"], ["defend"], ["evaluate-ood"], ["classifier", "train"]]


def option_line(text: str, option: str) -> str:
    """The row of the options table that declares `option`."""
    return next(ln for ln in text.splitlines() if "│" in ln and f"{option} " in ln)


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_show_no_bool_metavar(command):
    lines = [ln for ln in help_text(*command).splitlines() if "<bool>" in ln]
    assert all("--help" in ln for ln in lines), lines


def test_short_m_means_model_everywhere():
    attack = help_text("attack")
    method = option_line(attack, "--method")
    assert not re.search(r"\s-m\s", method)
    for command in (["purify"], ["defend"], ["evaluate-ood"]):
        model = option_line(help_text(*command), "--model")
        assert re.search(r"\s-m\s", model), command


def test_purify_help_names_no_missing_option():
    assert "--output" not in help_text("purify")


def test_fail_on_lists_and_checks_its_choices():
    assert "none|anomalous" in help_text("defend")
    result = CliRunner().invoke(app, ["defend", "x.png", "-c", "clf", "--fail-on", "sometimes"])
    assert result.exit_code == 2

"""Every command's --help, rendered as a user sees it (Rich, a wide terminal), read for what it says.

Rich markup eats text in square brackets unless it is escaped, and a string `show_default` renders as
"(128)": both passed unnoticed before, so the rendered text is checked against each option's own help.
"""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from stade_cli.cli import app

COMMANDS = [["calibrate"], ["stats", "show"], ["prune"], ["methods"], ["eval"], ["compare"]]


def render(*command: str) -> str:
    res = CliRunner().invoke(app, [*command, "--help"], prog_name="stade", env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return res.output


def flat(text: str) -> str:
    """The help as running text: box drawing gone, lines joined, whitespace collapsed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def click_command(*command: str):
    group = typer.main.get_command(app)
    cmd = group
    for name in command:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_renders_every_option_help_whole(command: list[str]) -> None:
    """Each option's help appears in full, brackets included (an unescaped '[...]' would vanish)."""
    text = flat(render(*command))
    for param in click_command(*command).params:
        help_text = getattr(param, "help", None)
        if help_text:
            expected = " ".join(help_text.replace("\\[", "[").split())
            assert expected in text, f"{param.name}: {expected!r} not in the rendered help"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_an_example_and_no_parenthesised_defaults(command: list[str]) -> None:
    text = flat(render(*command))
    assert "Example: stade " + command[0] in text
    assert not re.search(r"\[default: \(", text), "a string show_default renders as '(...)': write it in the help"
    assert not re.search(r"\w \.(\s|$)", text), "a word, a space, a full stop: eaten markup?"


def test_help_says_what_each_option_means() -> None:
    calibrate = flat(render("calibrate"))
    for phrase in (
        "a .safetensors file of token ids [n, seqlen]",
        "[default: c4]",
        "pip install 'stade[demo]'",
        "Number of calibration windows. [default: 128; a token-id file: all its windows]",
        "Tokens per window. [default: min(context, 2048)]",
        "--dtype <float32|float16|bfloat16> The dtype the model is loaded and run in. "
        "[default: the model's own on a GPU; float32 on CPU]",
    ):
        assert phrase in calibrate, phrase
    prune = flat(render("prune"))
    for phrase in (
        "Ratio(s) in [0, 1), comma-separated. [default: N/M for an N:M pattern]",
        "Seed of the random method's scores and of the reconstruction's held-out split",
        "The dtype the checkpoint is saved in. [default: the checkpoint's own]",
        "run in float32 on CPU",
    ):
        assert phrase in prune, phrase
    assert "for sampling" not in prune
    evaluate = flat(render("eval"))
    for phrase in (
        "a .safetensors file of ids [1, N]",
        "'paper' (the published seven: boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa",
        "[default: none, perplexity only]",
        "--tasks paper",
        "The dtype the model is loaded and run in.",
    ):
        assert phrase in evaluate, phrase

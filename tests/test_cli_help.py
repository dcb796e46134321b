"""Every command's help, rendered at a fixed width, shows each option's help in full and its
default (the renderer eats bracketed text such as "[default: 2e-5]" inside a help string)."""

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from alignscope.cli import app
from alignscope.config import DEFAULT_LR, DEFAULT_PREDICTOR, DEFAULT_RANK

WIDTH = 200


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


COMMANDS = list(_commands(typer.main.get_command(app)))


def _render(path) -> str:
    result = CliRunner().invoke(
        app, [*path, "--help"], terminal_width=WIDTH, env={"COLUMNS": str(WIDTH)}
    )
    assert result.exit_code == 0, result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_every_option_help_is_shown_whole(path):
    cmd = dict(COMMANDS)[path]
    text = _render(path)
    for param in cmd.params:
        if isinstance(param, click.Option) and param.help:
            assert " ".join(param.help.split()) in text, (path, param.name)
            assert "[" not in param.help, (path, param.name)  # brackets: eaten by the renderer
    assert " ." not in text.replace(" .gguf", "")  # a dangling full stop: something eaten


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        (("rank",), f"(default: {DEFAULT_LR:g}"),
        (("rank",), f"[default: {DEFAULT_PREDICTOR}]"),
        (("rank",), "(default: a tenth of --steps, at least 12)"),
        (("rank",), f"(default: {DEFAULT_RANK} unless --explained)"),
        (("rank",), "--eval-prompts"),
        (("diagnose",), "[default: 2e-05]"),
        (("verify",), "[default: 1000]"),
        (("organism", "build"), "(default: $ALIGNSCOPE_CACHE/organism/<preset>-seed<seed>"),
        (("report",), "(default: <log>-report)"),
    ],
)
def test_help_shows_the_defaults(path, shown):
    assert shown in _render(path)


def test_commands_share_one_definition_of_each_option():
    by_name = {path: {p.name: p for p in cmd.params} for path, cmd in COMMANDS}
    diagnose, verify, rank = by_name[("diagnose",)], by_name[("verify",)], by_name[("rank",)]
    for name in ("model", "safety", "rank", "max_data", "seed", "memory_budget_gb", "lora_r"):
        assert diagnose[name].help == verify[name].help == rank[name].help, name
        assert diagnose[name].default == verify[name].default == rank[name].default, name
    assert rank["eval_prompts"].help == verify["eval_prompts"].help

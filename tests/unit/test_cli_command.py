"""ims.cli.common.command(): the decorator every ``bmi`` command is declared with keeps click's parameters
(names, metavars, required-ness, order) exactly as writing the click decorators out would."""
from __future__ import annotations

import click
from click.testing import CliRunner

from ims.cli.common import Ctx, command
from ims.cli.main import cli


def _names(cmd: click.Command) -> list[str]:
    return [p.name or "" for p in cmd.params]


def test_arguments_then_options_below_then_no_wait() -> None:
    @click.command("x")
    @command("project_name:PROJECT", "img", "img2?", wait=True)
    @click.option("--snap", default=None)
    def x(c: Ctx, project_name: str, img: str, img2: str | None, snap: str | None, no_wait: bool) -> None:
        """X."""

    assert _names(x) == ["project_name", "img", "img2", "snap", "no_wait"]
    project, img, img2 = x.params[:3]
    assert isinstance(project, click.Argument) and project.make_metavar(click.Context(x)) == "PROJECT"
    assert project.required and img.required and not img2.required


def test_without_wait_there_is_no_no_wait_option() -> None:
    @click.command("y")
    @command("project")
    def y(c: Ctx, project: str) -> None:
        """Y."""

    assert _names(y) == ["project"]


def test_the_real_commands_keep_their_help_and_usage() -> None:
    runner = CliRunner()
    text = runner.invoke(cli, ["import", "--help"]).output
    assert "Usage: cli import [OPTIONS] PROJECT IMG" in text
    assert text.index("--snap") < text.index("--protect") < text.index("--no-wait")
    assert "Usage: cli cp [OPTIONS] SRC_PROJECT IMG1 DEST_PROJECT [IMG2]" in runner.invoke(cli, ["cp", "--help"]).output
    missing = runner.invoke(cli, ["disk", "create", "p1"])
    assert missing.exit_code == 2 and "Missing argument 'IMG'" in missing.output

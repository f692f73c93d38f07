"""Output: tables (the guide's PrettyTable layout) or JSON with ``--json``."""
from __future__ import annotations

import json
from typing import Any

import click
from prettytable import PrettyTable


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return str(value)  # booleans print as True/False


def rows(columns: list[str], data: list[list[Any]], as_json: bool) -> None:
    if as_json:
        keys = [c.lower().replace(" ", "_") for c in columns]
        click.echo(json.dumps([dict(zip(keys, row, strict=True)) for row in data], indent=2))
        return
    table = PrettyTable(columns)
    for row in data:
        table.add_row([_cell(v) for v in row])
    click.echo(table.get_string())


def success(as_json: bool, result: Any = None) -> None:
    if as_json:
        click.echo(json.dumps({"result": result if result is not None else "Success"}))
    else:
        click.echo("Success")


def value(result: Any, as_json: bool) -> None:
    click.echo(json.dumps({"result": result}) if as_json else str(result))

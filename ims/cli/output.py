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


def operation_id(record: dict[str, Any], as_json: bool) -> None:
    """``--no-wait``: the queued operation's id (its whole record with --json)."""
    click.echo(json.dumps({"result": record}) if as_json else str(record["id"]))


def operation_ids(nodes: list[str], records: list[dict[str, Any]], as_json: bool) -> None:
    """``bmi pro --no-wait`` with several nodes: ``NODE ID`` per line (the records with --json)."""
    if as_json:
        click.echo(json.dumps({"result": records}))
        return
    for node, record in zip(nodes, records, strict=True):
        click.echo(f"{node} {record['id']}")


def batch(nodes: list[str], records: list[dict[str, Any]], as_json: bool) -> None:
    """The outcome of each node of a batch: ``NODE: Success`` or ``NODE: failed: why``."""
    if as_json:
        click.echo(json.dumps({"result": [{"node": n, "operation": r["id"], "state": r["state"],
                                           "error": r.get("error")} for n, r in zip(nodes, records, strict=True)]}))
        return
    for node, record in zip(nodes, records, strict=True):
        if record["state"] == "done":
            click.echo(f"{node}: Success")
        else:
            error = record.get("error") or {}
            click.echo(f"{node}: failed: {error.get('message') or 'failed'}")


def records(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


FIELDS = ("id", "verb", "project", "user", "state", "queue_position", "progress", "steps_done", "step", "args",
          "result", "error", "created_at", "started_at", "finished_at")


def fields(record: dict[str, Any]) -> None:
    """One operation as a two-column table (Field, Value)."""
    table = PrettyTable(["Field", "Value"])
    table.align = "l"
    for key in FIELDS:
        value = record.get(key)
        if key == "error" and isinstance(value, dict):
            value = f"{value.get('type')} ({value.get('status')}): {value.get('message')}"
        elif key == "progress":
            value = f"{int(value or 0)}%"
        elif isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True)
        table.add_row([key, _cell(value)])
    click.echo(table.get_string())

"""Following asynchronous operations from the CLI: every mutation answers 202 with an operation record
(docs/api.md "Asynchronous operations"); by default the CLI waits for it to finish.

Progress goes to stderr, so stdout keeps the guide's exact ``Success``: a progress bar when stderr is a
terminal, otherwise one plain line whenever a still unfinished operation changes state or step (an
operation that finishes at once prints nothing there).
"""
from __future__ import annotations

import sys
from typing import Any, Protocol

import click

FINISHED = frozenset({"done", "failed"})
# Each status request waits (server side) at most this long for the operation to finish, so the
# answer comes as soon as it is done and the progress shown is at most this old.
POLL_SECONDS = 1


class Getter(Protocol):
    def get(self, path: str, params: dict[str, Any] | None = None) -> Any: ...


def describe(record: dict[str, Any]) -> str:
    """One line about an operation: ``operation 12 provision node1 (proj1): running: clone (40%)``."""
    args = record.get("args") or {}
    what = " ".join(str(args[k]) for k in ("node", "img", "disk", "snap_name", "name") if args.get(k))
    head = f"operation {record['id']} {record.get('verb', '')}{' ' + what if what else ''} ({record.get('project')})"
    state = record.get("state")
    if state == "queued":
        pos = record.get("queue_position")
        return f"{head}: queued" + (f" (position {pos})" if pos else "")
    if state == "running":
        step = record.get("step")
        return f"{head}: running{': ' + str(step) if step else ''} ({int(record.get('progress') or 0)}%)"
    if state == "failed":
        return f"{head}: failed: {error_message(record)}"
    return f"{head}: {state}"


def error_message(record: dict[str, Any]) -> str:
    error = record.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return f"operation {record.get('id')} failed"


def _weight(record: dict[str, Any]) -> int:
    return 100 if record.get("state") in FINISHED else max(0, min(100, int(record.get("progress") or 0)))


class Progress:
    """Shows how a set of operations advances: a bar on a terminal, plain lines otherwise."""

    def __init__(self, records: list[dict[str, Any]], stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = 100 * len(records)
        self._seen = {int(r["id"]): (r.get("state"), r.get("step")) for r in records}
        self._shown = sum(_weight(r) for r in records)
        self._bar: Any = None
        isatty = getattr(self.stream, "isatty", None)
        if callable(isatty) and isatty():
            label = describe(records[0]).split(":")[0] if len(records) == 1 else f"{len(records)} operations"
            self._bar = click.progressbar(length=self.total, label=label, file=self.stream, show_percent=True,
                                          show_eta=False)
            self._bar.__enter__()
            self._bar.update(self._shown)

    def update(self, records: list[dict[str, Any]]) -> None:
        if self._bar is not None:
            now = sum(_weight(r) for r in records)
            if now > self._shown:
                self._bar.update(now - self._shown)
                self._shown = now
            return
        for r in records:
            key = (r.get("state"), r.get("step"))
            if self._seen.get(int(r["id"])) != key and r.get("state") not in FINISHED:
                click.echo(describe(r), file=self.stream)
            self._seen[int(r["id"])] = key

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def wait(api: Getter, records: list[dict[str, Any]], stream: Any = None) -> list[dict[str, Any]]:
    """Wait until every operation is done or failed; their final records, in the same order.

    Each round long-polls the first unfinished operation (it answers as soon as that one finishes);
    the others of a batch are refreshed with one listing of their project, and fetched one by one only
    when the listing (the newest operations) no longer holds them.
    """
    current = {int(r["id"]): r for r in records}
    order = [int(r["id"]) for r in records]
    progress = Progress(records, stream)
    try:
        while True:
            pending = [i for i in order if current[i].get("state") not in FINISHED]
            if not pending:
                return [current[i] for i in order]
            first = pending[0]
            current[first] = api.get(f"/operations/{first}", {"wait": str(POLL_SECONDS)})
            rest = pending[1:]
            if rest:
                listed = {int(r["id"]): r for r in api.get("/operations", {"project": current[first]["project"]})}
                for i in rest:
                    current[i] = listed[i] if i in listed else api.get(f"/operations/{i}")
            progress.update([current[i] for i in order])
    except KeyboardInterrupt:
        # Ctrl-C stops the waiting, not the work: say how to find the operations again.
        progress.close()
        ids = " ".join(str(i) for i in order if current[i].get("state") not in FINISHED)
        click.echo(f"\ninterrupted: BMI carries on with operation(s) {ids}; follow with `bmi op show --wait ID`",
                   err=True)
        raise click.exceptions.Exit(130) from None
    finally:
        progress.close()

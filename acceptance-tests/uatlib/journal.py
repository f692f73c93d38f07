"""The scenario journal: what a scenario created, so that after_scenario can undo it after a failure.

Each entry is a compensating command (an argument list).  Steps record an entry once the thing exists and drop it
when the scenario itself removes the thing, so a passing scenario ends with an empty journal.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from uatlib.commands import Result, bmi, rbd


@dataclass
class Journal:
    entries: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def record(self, kind: str, *args: str) -> None:
        self.entries.append((kind, args))

    def forget(self, kind: str, *args: str) -> None:
        if (kind, args) in self.entries:
            self.entries.remove((kind, args))

    def rollback(self) -> list[str]:
        """Undo in reverse order; errors are reported, not raised (undo as much as possible)."""
        report = []
        while self.entries:
            kind, args = self.entries.pop()
            result = _undo(kind, args)
            report.append(f"rollback {kind} {' '.join(args)}: exit {result.rc} {result.stdout.strip()} "
                          f"{result.stderr.strip()}".strip())
        return report


def _undo(kind: str, args: tuple[str, ...]) -> Result:
    if kind == "rbd_create":  # (image)
        return rbd("rm", args[0])
    if kind == "bmi_import":  # (project, image)
        return bmi("rm", args[0], args[1])
    if kind == "bmi_pro":  # (project, node, network, nic)
        return bmi("dpro", *args)
    if kind == "bmi_snap":  # (project, snapshot)
        return bmi("snap", "rm", *args)
    raise ValueError(f"unknown journal entry {kind}")

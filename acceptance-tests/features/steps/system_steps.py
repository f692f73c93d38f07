"""Minimum versions of the tools a BMI deployment needs."""
from __future__ import annotations

import shlex
from typing import Any

from behave import step
from uatlib import commands as c
from uatlib.versions import at_least, parse_version


@step("these components meet their minimum versions")
def components_meet_minimum(context: Any) -> None:
    problems = []
    for row in context.table:
        result = c.run(shlex.split(row["command"]), timeout=60)
        if result.rc != 0:
            problems.append(result.describe())
            continue
        found = parse_version(result.stdout + result.stderr)
        minimum = parse_version(row["minimum"])
        print(f"      -> {row['component']}: {'.'.join(map(str, found))} (minimum {row['minimum']})")
        if not at_least(found, minimum):
            problems.append(f"{row['component']} {'.'.join(map(str, found))} is older than {row['minimum']}")
    assert not problems, "\n".join(problems)


@step("version {found} meets minimum {minimum} is {verdict}")
def version_comparison(context: Any, found: str, minimum: str, verdict: str) -> None:
    assert at_least(parse_version(found), parse_version(minimum)) is (verdict == "true")

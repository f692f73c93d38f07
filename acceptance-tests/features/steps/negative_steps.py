"""Requests BMI must refuse: exit status 1, a message on stderr, nothing changed."""
from __future__ import annotations

import re
import shlex
from typing import Any

from behave import step
from uatlib import commands as c


def _run(context: Any, command: str, env: dict[str, str] | None = None) -> None:
    argv = [c.expand(token) for token in shlex.split(command)]
    context.result = c.bmi(*argv, env=env)


@step('BMI runs "{command}" with a wrong password')
def bmi_wrong_password(context: Any, command: str) -> None:
    _run(context, command, {"HIL_PASSWORD": c.expand("${HIL_PASSWORD}-wrong"), "HAAS_PASSWORD": ""})


@step('BMI runs "{command}" as "{user}" with the password "{password}"')
def bmi_as_user(context: Any, command: str, user: str, password: str) -> None:
    _run(context, command, {"HIL_USERNAME": c.expand(user), "HIL_PASSWORD": c.expand(password),
                            "HAAS_USERNAME": "", "HAAS_PASSWORD": ""})


@step('BMI runs "{command}"')
def bmi_runs(context: Any, command: str) -> None:
    _run(context, command)


@step('the command fails with a message matching "{pattern}"')
def command_fails(context: Any, pattern: str) -> None:
    result = context.result
    assert result.rc == 1, f"expected exit status 1:\n{result.describe()}"
    assert result.stdout.strip() != "Success", result.describe()
    assert re.search(pattern, result.stderr, re.IGNORECASE), f"stderr does not match {pattern!r}:\n{result.describe()}"
    assert "Traceback" not in result.stderr, f"a traceback instead of an error message:\n{result.describe()}"


@step('node "{node}" of "{project}" is not provisioned')
def node_not_provisioned(context: Any, node: str, project: str) -> None:
    node, project = c.expand(node), c.expand(project)
    assert c.db_row(node, project) is None, f"node {node} has a record in `bmi db ls`"
    result = c.bmi("showpro", project)
    assert result.rc == 0, result.describe()
    assert not re.search(rf"\|\s*{re.escape(node)}\s*\|", result.stdout), f"`bmi showpro` lists {node}:\n" \
        f"{result.stdout}"


@step('BMI has no image named "{image}" in "{project}"')
def no_image(context: Any, image: str, project: str) -> None:
    assert c.db_row(c.expand(image), c.expand(project)) is None


def _state() -> tuple[Any, ...]:
    return (sorted((r["id"], r["name"], r["project"], r["ceph"]) for r in c.db_rows()), sorted(c.rbd_ls()),
            sorted((k, tuple(v)) for k, v in c.tgt_targets().items()))


@step("the BMI, Ceph and iSCSI state is recorded")
def record_state(context: Any) -> None:
    context.state_before = _state()


@step("the BMI, Ceph and iSCSI state is unchanged")
def state_unchanged(context: Any) -> None:
    after = _state()
    assert after == context.state_before, f"state changed:\nbefore {context.state_before}\nafter  {after}"

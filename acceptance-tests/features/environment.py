"""behave hooks: make uatlib importable, check the deployment config, and undo what a failed scenario created."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # acceptance-tests/, for uatlib

from uatlib.journal import Journal

REQUIRED = ("BMI_PROJECT", "HIL_NODE", "HIL_NIC", "HIL_NETWORK", "BMI_IMAGE_NAME", "BMI_SNAPSHOT_NAME",
            "BMI_CONFIG", "HIL_USERNAME", "HIL_PASSWORD")


def before_all(context: Any) -> None:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"the deployment config does not set {', '.join(missing)}; run through "
                           "acceptance-tests/bmi-uat.py --run NAME (config/tests-uat/NAME/config)")


def before_scenario(context: Any, scenario: Any) -> None:
    context.journal = Journal()
    context.clones = {}  # image name -> the Ceph name of its clone in BMI


def after_scenario(context: Any, scenario: Any) -> None:
    journal: Journal = context.journal
    if not journal.entries:
        return
    # Something the scenario created is still there: a step failed half-way.  Undo it like the original's
    # test_rollback, and keep a record next to the results.
    report = journal.rollback()
    text = f"scenario {scenario.name!r} ({scenario.status}):\n" + "\n".join(report) + "\n"
    print(text)
    run_dir = os.environ.get("UAT_RUN_DIR")
    if run_dir:
        with open(Path(run_dir) / "rollback.log", "a", encoding="utf-8") as fh:
            fh.write(text)

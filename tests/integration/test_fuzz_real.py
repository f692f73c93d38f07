"""A bounded fuzz run against a REAL stack (Ceph, tgtd, the HIL simulator, Einstein, Picasso).

schemathesis drives /v1 from the service's own OpenAPI document, as the tenant and as an admin
(fixed seed and number of examples), a form fuzzer drives the legacy endpoints with hostile values
and credentials; then the state is checked: reconcile finds nothing the calls do not explain, and
after everything is removed through the API, storage, targets, tgt conf files, boot files, the
database and HIL's attachments are as before.  benchmarks/fuzz.py runs the same for longer.
"""
from __future__ import annotations

from pathlib import Path

import requests
from openapi_spec_validator import validate

from benchmarks.fuzz import fuzz, summary
from tests.support.stack import running_stack

SEED = 20261126


def test_fuzzing_finds_no_server_error_and_leaves_nothing_unexplained(tmp_path: Path) -> None:
    with running_stack() as stack:
        served = requests.get(f"{stack.url}/v1/openapi.json", timeout=60)
        assert served.status_code == 200
        validate(served.json())
        tally, leftovers = fuzz(stack, SEED, tmp_path, max_examples=15, form_requests=1500)
    report = summary(tally, leftovers) + "\n" + "\n".join(tally.violations)
    print(report)
    # the run reached the code behind the checks, not only 404s and 401s
    assert tally.requests > 3000 and tally.ok > 100, report
    assert tally.server_errors == 0, report
    assert tally.violations == [], report
    assert leftovers == 0, report

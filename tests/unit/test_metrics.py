"""GET /metrics through Flask's test client, over the REAL Operations on the fake drivers (as test_rest)."""
from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ims.common import config as bmi_config
from ims.common.errors import ServiceUnavailable
from ims.picasso.app import create_app
from tests.support.fake_ops import InProcessClient
from tests.unit.test_rest import ADMIN, ALICE, BOB, CFG_TEXT, err, rpc, world  # noqa: F401 - fixtures

__all__ = ["rpc", "world"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(web: Any, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = web.get("/metrics", headers=headers or {})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.content_type.startswith("text/plain; version=0.0.4")
    return samples(resp.get_data(as_text=True))


def app_for(client: Any, extra: str = "") -> Any:
    return create_app(bmi_config.parse("t.cfg", text=CFG_TEXT + extra), client=client).test_client()


def test_requests_are_counted_by_api_verb_and_status_and_timed(rpc: InProcessClient) -> None:
    web = app_for(rpc)
    before = scrape(web)
    assert before[("bmi_einstein_up", ())] == 1.0
    assert ("bmi_requests_total", (("api", "v1"), ("status", "200"), ("verb", "list_images"))) not in before
    assert web.get("/v1/projects/proj1/images", headers=ALICE).status_code == 200
    assert web.get("/v1/projects/proj2/images", headers=BOB).status_code == 200
    err(web.get("/v1/projects", headers=ALICE), 403)
    err(web.post("/v1/projects", headers=ADMIN, data=b"x" * 5000, content_type="application/json"), 413)
    err(web.get("/no/such/route"), 404)
    assert web.post("/list_images/", data={"project": "proj1"}, headers=ALICE).status_code == 200
    after = scrape(web)
    assert after[("bmi_requests_total", (("api", "v1"), ("status", "200"), ("verb", "list_images")))] == 2.0
    assert after[("bmi_requests_total", (("api", "v1"), ("status", "403"), ("verb", "list_projects")))] == 1.0
    assert after[("bmi_requests_total", (("api", "v1"), ("status", "413"), ("verb", "create_project")))] == 1.0
    assert after[("bmi_requests_total", (("api", "none"), ("status", "404"), ("verb", "unmatched")))] == 1.0
    assert after[("bmi_requests_total", (("api", "legacy"), ("status", "200"), ("verb", "list_images")))] == 1.0
    assert after[("bmi_requests_total", (("api", "metrics"), ("status", "200"), ("verb", "metrics")))] == 1.0
    assert after[("bmi_request_duration_seconds_count", (("api", "v1"), ("verb", "list_images")))] == 2.0
    # the 413 was refused by a before_request hook: it is timed all the same
    assert after[("bmi_request_duration_seconds_count", (("api", "v1"), ("verb", "create_project")))] == 1.0
    assert after[("bmi_requests_in_progress", ())] == 1.0  # the scrape itself
    # Einstein's side (over the fake drivers: nothing queued, nothing unfinished)
    assert after[("bmi_operations_queued", ())] == 0.0
    assert after[("bmi_operations_running", ())] == 0.0
    assert after[("bmi_journal_unfinished", (("state", "running"),))] == 0.0
    assert after[("bmi_flatten_jobs", (("state", "queued"),))] == 0.0
    assert after[("bmi_iscsi_targets_live", ())] == 0.0
    assert after[("bmi_db_up", ())] == 1.0 and after[("bmi_iscsi_up", ())] == 1.0


class Unreachable:
    """An Einstein that cannot be reached: every call fails as EinsteinClient's would."""

    def __getattr__(self, name: str) -> Any:
        def fail(*_a: Any, **_k: Any) -> Any:
            raise ServiceUnavailable("cannot reach the BMI back-end (Einstein)")
        return fail


class Crashing:
    def service_status(self) -> Any:
        raise RuntimeError("bug")


def test_einstein_down_is_a_gauge_not_a_failed_scrape() -> None:
    for client in (Unreachable(), Crashing()):
        got = scrape(app_for(client))
        assert got[("bmi_einstein_up", ())] == 0.0
        assert ("bmi_operations_queued", ()) not in got and ("bmi_iscsi_targets_live", ()) not in got


def test_metrics_auth_admin(rpc: InProcessClient) -> None:
    web = app_for(rpc, "metrics_auth = admin\n")
    err(web.get("/metrics"), 401, "AuthenticationFailed")
    err(web.get("/metrics", headers=BOB), 403)
    assert scrape(web, ADMIN)[("bmi_einstein_up", ())] == 1.0


def test_metrics_auth_must_be_known() -> None:
    import pytest

    from ims.common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[rest_api\] metrics_auth"):
        bmi_config.parse("t.cfg", text=CFG_TEXT + "metrics_auth = tenants\n")


def test_einstein_gauges_come_from_the_task_journal_and_flatten_tables(rpc: InProcessClient, world: Any) -> None:
    from ims.database.models import Operation, Task
    from ims.einstein.flatten import FlattenJob

    web = app_for(rpc)
    with world.ops.sessions() as s, s.begin():
        for verb, state in (("provision", "queued"), ("provision", "queued"), ("provision", "running"),
                            ("import_image", "running"), ("deprovision", "done"), ("deprovision", "failed")):
            s.add(Task(verb=verb, project="proj1", user="alice", args="{}", state=state, owner="h:1:1",
                       cluster="c"))
        for state in ("running", "failed", "done", "rolled_back"):
            s.add(Operation(kind="provision", owner="h:1:1", state=state))
        s.add(FlattenJob(image="timg9", source="timg1", snap="s", state="running"))
        s.add(FlattenJob(image="timg8", source="timg1", snap="s", state="queued"))
    got = scrape(web)
    assert got[("bmi_operations", (("state", "queued"), ("verb", "provision")))] == 2.0
    assert got[("bmi_operations", (("state", "running"), ("verb", "provision")))] == 1.0
    assert got[("bmi_operations", (("state", "running"), ("verb", "import_image")))] == 1.0
    assert ("bmi_operations", (("state", "done"), ("verb", "deprovision"))) not in got
    assert got[("bmi_operations_queued", ())] == 2.0 and got[("bmi_operations_running", ())] == 2.0
    assert got[("bmi_journal_unfinished", (("state", "running"),))] == 1.0
    assert got[("bmi_journal_unfinished", (("state", "failed"),))] == 1.0
    assert got[("bmi_flatten_jobs", (("state", "running"),))] == 1.0
    assert got[("bmi_flatten_jobs", (("state", "queued"),))] == 1.0
    assert got[("bmi_flatten_jobs", (("state", "cancelling"),))] == 0.0


def test_a_part_einstein_cannot_read_is_marked_down_alone(rpc: InProcessClient, world: Any,
                                                          monkeypatch: Any) -> None:
    from ims.common.errors import IscsiError

    def down() -> list[str]:
        raise IscsiError("failed to send request hdr to tgt daemon")

    monkeypatch.setattr(world.ops.iscsi, "live_targets", down)
    got = scrape(app_for(rpc))
    assert got[("bmi_einstein_up", ())] == 1.0 and got[("bmi_db_up", ())] == 1.0
    assert got[("bmi_iscsi_up", ())] == 0.0 and ("bmi_iscsi_targets_live", ()) not in got
    assert got[("bmi_operations_queued", ())] == 0.0

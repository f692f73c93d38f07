"""``GET /metrics``: Picasso's and Einstein's numbers in the Prometheus text format.

Picasso is one process (threads), so its request counters live here, in a registry of its
own per app.  Einstein's numbers (asynchronous operations queued and running, unfinished
journal entries, live iSCSI targets, background flatten jobs) are read on each scrape with
ONE read-only RPC call (``service_status``) under a short timeout; if Einstein cannot be
reached the scrape still answers 200, with ``bmi_einstein_up 0`` and without those gauges.

Access (``[rest_api] metrics_auth``): ``none`` (the default: the numbers carry verbs and
counts only, never a project, user, node or image name) or ``admin`` (HTTP Basic with a BMI
administrator's credentials, as /v1/admin/*).  Labels are bounded: ``verb`` is a route's
name (or ``unmatched``), never a path.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ims.common.errors import BMIError, ConfigError
from ims.picasso import auth

LOG = logging.getLogger(__name__)

# The text format generate_latest writes (0.0.4): every Prometheus server reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ACCESS = ("none", "admin")
# A scrape must not hang on a stuck Einstein (Prometheus's own default timeout is 10 s).
EINSTEIN_TIMEOUT_SECONDS = 5.0
# Seconds: from a cached read (ms) to a slow synchronous provision or import (minutes).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TASK_STATES = ("queued", "running")
FLATTEN_STATES = ("queued", "running", "cancelling")

bp = Blueprint("metrics", __name__)


class EinsteinCollector(Collector):
    """Asks Einstein at collect time (that is, once per scrape)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def describe(self) -> list[GaugeMetricFamily]:
        # Without it the registry would call collect() (an RPC call) when the collector is registered.
        return []

    def _status(self) -> dict[str, Any] | None:
        try:
            status = self.client.service_status()
        except (BMIError, AttributeError, OSError) as exc:
            LOG.warning("metrics: Einstein did not answer: %s", exc)
            return None
        except Exception:  # noqa: BLE001 - a scrape never fails because of Einstein
            LOG.exception("metrics: Einstein status call failed")
            return None
        return status if isinstance(status, dict) else None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self._status()
        up = GaugeMetricFamily("bmi_einstein_up", "1 if Einstein answered this scrape's status call, else 0")
        up.add_metric([], 0 if status is None else 1)
        yield up
        if status is None:
            return
        errors = status.get("errors") or {}
        for part, what in (("db", "the BMI database"), ("iscsi", "the iSCSI target daemon")):
            gauge = GaugeMetricFamily(f"bmi_{part}_up", f"1 if Einstein could read {what} for this scrape")
            gauge.add_metric([], 0 if part in errors else 1)
            yield gauge
        yield from self._tasks(status.get("tasks"))
        journal = status.get("journal")
        if isinstance(journal, dict):
            gauge = GaugeMetricFamily("bmi_journal_unfinished", "Journal entries not finished (running; failed: "
                                      "rollback failed, recovery retries it)", labels=["state"])
            for state, n in sorted(journal.items()):
                gauge.add_metric([str(state)], float(n))
            yield gauge
        flatten = status.get("flatten")
        if isinstance(flatten, dict):
            gauge = GaugeMetricFamily("bmi_flatten_jobs", "Background flatten jobs (copies still to be made "
                                      "independent of their source)", labels=["state"])
            for state in sorted(set(FLATTEN_STATES) | set(flatten)):
                gauge.add_metric([str(state)], float(flatten.get(state, 0)))
            yield gauge
        if isinstance(status.get("targets_live"), int):
            yield GaugeMetricFamily("bmi_iscsi_targets_live", "BMI's iSCSI targets live in the target daemon",
                                    value=float(status["targets_live"]))

    @staticmethod
    def _tasks(tasks: Any) -> Iterator[GaugeMetricFamily]:
        if not isinstance(tasks, list):
            return
        by_verb = GaugeMetricFamily("bmi_operations", "Asynchronous operations queued or running, by verb",
                                    labels=["verb", "state"])
        totals = {state: 0 for state in TASK_STATES}
        for verb, state, n in tasks:
            by_verb.add_metric([str(verb), str(state)], float(n))
            totals[state] = totals.get(state, 0) + int(n)
        yield by_verb
        for state in TASK_STATES:
            yield GaugeMetricFamily(f"bmi_operations_{state}", f"Asynchronous operations {state} (all verbs)",
                                    value=float(totals[state]))


class Metrics:
    """One per app: its own registry (several apps in one test process do not share counters)."""

    def __init__(self, einstein: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("bmi_requests", "Requests Picasso answered, by API, verb (route name) and "
                                "HTTP status", ["api", "verb", "status"], registry=self.registry)
        self.latency = Histogram("bmi_request_duration_seconds", "Time Picasso took to answer, by API and verb",
                                 ["api", "verb"], buckets=BUCKETS, registry=self.registry)
        self.in_progress = Gauge("bmi_requests_in_progress", "Requests Picasso is handling now",
                                 registry=self.registry)
        self.registry.register(EinsteinCollector(einstein))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _labels() -> tuple[str, str]:
    endpoint = request.endpoint
    if not endpoint:
        return "none", "unmatched"
    api, _, verb = endpoint.rpartition(".")
    return api or "app", verb


def status_client(cfg: Any) -> Any:
    """An Einstein client for the scrape's call, with the short timeout."""
    from ims.rpc.client import EinsteinClient

    rpc = SimpleNamespace(**{**cfg.rpc.values, "timeout": min(float(cfg.rpc.timeout), EINSTEIN_TIMEOUT_SECONDS)})
    return EinsteinClient(SimpleNamespace(rpc=rpc))


def init_app(app: Flask, cfg: Any, einstein: Any) -> None:
    """Count every request of ``app`` and serve /metrics.  Call before any other before_request hook,
    so requests those refuse (413) are timed too."""
    access = cfg.rest_api.metrics_auth
    if access not in ACCESS:  # config.parse refuses it already; a hand-made config too
        raise ConfigError(f"invalid value {access!r} for [rest_api] metrics_auth: use none or admin")
    metrics = Metrics(einstein)
    app.extensions["bmi_metrics"] = {"metrics": metrics, "access": access}

    @app.before_request
    def start_timer() -> None:
        g.bmi_started = time.perf_counter()
        metrics.in_progress.inc()

    @app.after_request
    def count(resp: Response) -> Response:
        started = g.get("bmi_started")
        api, verb = _labels()
        metrics.requests.labels(api, verb, str(resp.status_code)).inc()
        if started is not None:
            metrics.latency.labels(api, verb).observe(time.perf_counter() - started)
        return resp

    @app.teardown_request
    def done(_exc: BaseException | None) -> None:
        # teardown runs even when an after_request hook failed: the gauge never drifts up
        if g.pop("bmi_started", None) is not None:
            metrics.in_progress.dec()

    app.register_blueprint(bp)


@bp.get("/metrics", endpoint="metrics")
def metrics_endpoint() -> Response:
    state = current_app.extensions["bmi_metrics"]
    if state["access"] == "admin":
        auth.admin_access()  # 401 / 403 as JSON, like the API
    return Response(state["metrics"].exposition(), mimetype=None, content_type=CONTENT_TYPE)

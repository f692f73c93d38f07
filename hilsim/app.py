"""Flask app speaking HIL's v0 REST API (reference/hil-api.md) over :class:`HILState`.

Like real HIL: JSON bodies are raw (a form content type means "no body", since
Werkzeug consumes it), unknown keys and GET bodies are 400, error bodies are
``{"type", "msg"}`` served as ``text/html``, and unknown routes get Werkzeug's HTML
404 page. ``GET /v0/_sim/state`` is a simulator extension (admin only) for tests.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request

from hilsim.errors import SimError, ValidationError
from hilsim.inventory import load_inventory
from hilsim.model import Caller, HILState
from hilsim.power import PowerController

# key -> (type, required)
Schema = dict[str, tuple[type, bool]]
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
HTML = "text/html; charset=utf-8"  # what HIL sends, even for JSON
EXTENSIONS = ["hil.ext.auth.database", "hil.ext.network_allocators.vlan_pool",
              "hil.ext.obm.mock", "hil.ext.switches.mock"]


# (method, rule, HILState method, body schema) of the calls HILState answers as they are.
PASS_THROUGH: list[tuple[str, str, str, Schema | None]] = [
    ("GET", "/projects", "list_projects", None),
    ("PUT", "/project/<project>", "project_create", None),
    ("DELETE", "/project/<project>", "project_delete", None),
    ("GET", "/project/<project>/nodes", "list_project_nodes", None),
    ("GET", "/project/<project>/networks", "list_project_networks", None),
    ("POST", "/project/<project>/connect_node", "project_connect_node", {"node": (str, True)}),
    ("POST", "/project/<project>/detach_node", "project_detach_node", {"node": (str, True)}),
    ("PUT", "/auth/basic/user/<user>", "user_create", {"password": (str, True), "is_admin": (bool, False)}),
    ("DELETE", "/auth/basic/user/<user>", "user_delete", None),
    ("POST", "/auth/basic/user/<user>/add_project", "user_add_project", {"project": (str, True)}),
    ("POST", "/auth/basic/user/<user>/remove_project", "user_remove_project", {"project": (str, True)}),
    ("GET", "/node/<node>", "show_node", None),
    ("GET", "/nodes/<which>", "list_nodes", None),
    ("PUT", "/node/<node>/nic/<nic>", "nic_register", {"macaddr": (str, True)}),
    ("GET", "/networking_action/<status_id>", "show_action", None),
    ("PUT", "/network/<network>", "network_create",
     {"owner": (str, True), "access": (str, True), "net_id": (str, True)}),
    ("DELETE", "/network/<network>", "network_delete", None),
    ("GET", "/network/<network>", "show_network", None),
    ("GET", "/_sim/state", "dump", None),
]


class Simulator:
    """What the app holds: the state and the power controller; ``close()`` on shutdown."""

    def __init__(self, state: HILState, power: PowerController) -> None:
        self.state = state
        self.power = power

    def close(self) -> None:
        self.state.close()
        self.power.stop_all()


def _body(schema: Schema) -> dict[str, Any]:
    raw = b"" if request.mimetype in FORM_TYPES else request.get_data(cache=True)
    if request.method == "GET":
        if raw.strip():
            raise ValidationError("GET requests must not have a body.")
        return {}
    if not raw.strip():
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except ValueError:
            raise ValidationError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ValidationError("The request body must be a JSON object.")
    unknown = sorted(set(body) - set(schema))
    if unknown:
        raise ValidationError(f"Unexpected key(s) in the request body: {', '.join(unknown)}")
    for key, (typ, required) in schema.items():
        if key not in body:
            if required:
                raise ValidationError(f"Missing key {key!r} in the request body.")
            continue
        value = body[key]
        ok = type(value) is bool if typ is bool else isinstance(value, typ) and not isinstance(value, bool)
        if not ok:
            raise ValidationError(f"Key {key!r} should be of type {typ.__name__}.")
    return body


def _caller(state: HILState) -> Caller:
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return state.authenticate(None, None)
    return state.authenticate(auth.username, auth.password)


def _reply(result: Any) -> Response:
    status = 200
    if isinstance(result, tuple):
        result, status = result
    text = "" if result is None else json.dumps(result)
    return Response(text, status=status, content_type=HTML)


def create_app(inventory: dict[str, Any], action_delay: float = 0.2) -> Flask:
    """A HIL simulator seeded from ``inventory``; ``app.extensions["hilsim"]`` is the :class:`Simulator`."""
    state = HILState(action_delay)
    load_inventory(state, inventory)
    sim = Simulator(state, PowerController(state))
    app = Flask("hilsim")
    app.extensions["hilsim"] = sim

    @app.errorhandler(SimError)
    def _sim_error(exc: SimError) -> Response:
        return Response(json.dumps({"type": exc.type, "msg": exc.msg}), status=exc.status, content_type=HTML)

    def api(method: str, rule: str, schema: Schema | None = None) -> Callable[[Callable[..., Any]], Any]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            def view(**kwargs: Any) -> Response:
                body = _body(schema or {})
                caller = _caller(state)
                return _reply(fn(caller, **kwargs, **body))

            app.add_url_rule("/v0" + rule, endpoint=f"{method} {rule}", view_func=view, methods=[method])
            return fn
        return register

    power = sim.power

    # Calls that only hand the caller, the URL's parts and the body's keys to HILState (its parameters
    # carry the same names) and answer 200 with what it returns (nothing: an empty body).
    for method, rule, name, schema in PASS_THROUGH:
        api(method, rule, schema)(getattr(state, name))

    # --- nodes and nics ---------------------------------------------------------------------
    @api("PUT", "/node/<node>", {"obm": (dict, False), "obmd": (dict, False)})
    def node_register(caller: Caller, node: str, obm: dict[str, Any] | None = None,
                      obmd: dict[str, Any] | None = None) -> Any:
        if (obm is None) == (obmd is None):
            raise ValidationError("Give exactly one of 'obm' (HIL v0.3) or 'obmd' (HIL master).")
        state.node_register(caller, node, obm or obmd or {})

    @api("POST", "/node/<node>/nic/<nic>/connect_network", {"network": (str, True), "channel": (str, False)})
    def connect_network(caller: Caller, node: str, nic: str, network: str, channel: str | None = None) -> Any:
        return {"status_id": state.connect_network(caller, node, nic, network, channel)}, 202

    @api("POST", "/node/<node>/nic/<nic>/detach_network", {"network": (str, True)})
    def detach_network(caller: Caller, node: str, nic: str, network: str) -> Any:
        return {"status_id": state.detach_network(caller, node, nic, network)}, 202

    # --- power (v0.3 semantics: 200, in-process mock OBM) -------------------------------------
    @api("POST", "/node/<node>/power_cycle", {"force": (bool, False)})
    def node_power_cycle(caller: Caller, node: str, force: bool = False) -> Any:
        power.power_cycle(state.node_for_power(caller, node), force)

    @api("POST", "/node/<node>/power_off")
    def node_power_off(caller: Caller, node: str) -> Any:
        power.power_off(state.node_for_power(caller, node))

    @api("GET", "/node/<node>/power_status")
    def node_power_status(caller: Caller, node: str) -> Any:
        return {"power_status": power.power_status(state.node_for_power(caller, node))}

    @api("PUT", "/node/<node>/boot_device", {"bootdev": (str, True)})
    def node_set_bootdev(caller: Caller, node: str, bootdev: str) -> Any:
        power.set_bootdev(state.node_for_power(caller, node), bootdev)

    # --- networks -------------------------------------------------------------------------------
    @api("GET", "/network/<network>/attachments")
    def list_network_attachments(caller: Caller, network: str) -> Any:
        return state.network_attachments(caller, network, request.args.get("project"))

    # --- misc -------------------------------------------------------------------------------------
    @api("GET", "/active_extensions")
    def active_extensions(caller: Caller) -> Any:
        return EXTENSIONS

    return app

"""BMI's net isolator: the interface operations use, and its HIL v0 REST client.

The client is written against the facts in ``reference/hil-api.md`` (observed on real
HIL v0.3 and master), so it works unchanged against real HIL and against
:mod:`hilsim`:

* JSON bodies go out as raw ``data`` with ``Content-Type: application/json``; a
  form content type would make Werkzeug swallow the body (hil-api.md §3.1).
* 401 means both "bad password" and "no access to the project"; an unknown user is a
  404 (§3.2, §3.3). Error bodies may be HTML (§3.4).
* connect/detach_network are asynchronous: 202 ``{"status_id"}``, then poll
  ``networking_action/<id>`` (§3.5). HIL v0.2 answered 202 with an empty body.
* power_cycle always carries a JSON body, because master redirects to obmd, which
  refuses an empty one (§3.9).
"""
from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import re
import threading
import time
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from ims.common.errors import (
    AuthenticationFailed,
    Conflict,
    Forbidden,
    HILError,
    HILUnavailable,
    InvalidInput,
    NicNotFound,
    NodeNotFound,
    NotFound,
    ProjectNotFound,
)
from ims.common.names import normalize_mac, validate_name

LOG = logging.getLogger(__name__)

DEFAULT_CHANNEL = "vlan/native"
# Polling a networking action: start fast (the simulator finishes in ~0.2 s), back off
# to at most one request a second so a slow serve-networks daemon is not hammered.
# The first re-poll comes soon: HIL (and the simulator without delay) often finishes an action
# within a few ms, and a 50 ms first sleep was a third of a provision.
POLL_START = 0.005
POLL_CAP = 1.0
POLL_FACTOR = 3  # 5, 15, 45, 135, 405 ms, then every second

# One keep-alive HTTP session per (HIL URL, user, password digest), shared by every client a worker
# process builds: an operation no longer pays a TCP connect (and the simulator's/HIL's accept).
_SESSIONS: dict[tuple[str, str, str], requests.Session] = {}
_SESSIONS_LOCK = threading.Lock()


def _shared_session(base_url: str, username: str, password: str) -> requests.Session:
    key = (base_url, username, hashlib.sha256(password.encode("utf-8", "surrogatepass")).hexdigest())
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            session = requests.Session()
            session.auth = (username, password)
            # perf: the environment's proxy and CA-bundle settings are read here, once per session,
            # for this one URL (requests re-reads them on every request otherwise: a walk over the
            # whole environment, a third of the CPU a HIL request costs the worker)
            session.proxies.update(requests.utils.get_environ_proxies(base_url))
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            if bundle:
                session.verify = bundle
            session.trust_env = False
            # Many worker threads share it: let each keep its own connection.
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            _SESSIONS[key] = session
        return session

# HIL's get_or_404 says "<Class> <name> does not exist."; the class names the resource.
_NOT_FOUND_RE = re.compile(r"^\s*(User|Node|Nic|Project|Network)\b")


class NetIsolator(abc.ABC):
    """What BMI's operations need from a network isolation / power service.

    Every method raises :class:`ims.common.errors.BMIError` subclasses only:
    AuthenticationFailed (401), NotFound family (404), Conflict (409),
    InvalidInput (400), HILUnavailable (503) or HILError.
    """

    @abc.abstractmethod
    def authenticate(self) -> None:
        """Check the credentials; raise AuthenticationFailed if they are wrong."""

    @abc.abstractmethod
    def is_admin(self) -> bool:
        """True if the credentials belong to an administrator."""

    @abc.abstractmethod
    def list_project_nodes(self, project: str) -> list[str]:
        """Nodes of ``project``; also the access probe (401 -> AuthenticationFailed)."""

    def check_project_access(self, project: str) -> None:
        """Raise AuthenticationFailed / ProjectNotFound unless the user may use ``project``."""
        self.list_project_nodes(project)

    @abc.abstractmethod
    def show_node(self, node: str) -> dict[str, Any]:
        """The node record: ``{"name", "project", "nics": [{"label", "macaddr", "networks"}]}``."""

    def node_mac(self, node: str, nic: str) -> str:
        """MAC of the nic labelled ``nic`` (lower case, colons); NicNotFound if absent."""
        return normalize_mac(_find_nic(self.show_node(node), node, nic).get("macaddr"))

    def node_project(self, node: str) -> str | None:
        """The project owning ``node``, or None if the node is free."""
        project = self.show_node(node).get("project")
        return str(project) if project else None

    def nic_networks(self, node: str, nic: str) -> dict[str, str]:
        """Current attachments of the nic: ``{channel: network}``."""
        networks = _find_nic(self.show_node(node), node, nic).get("networks") or {}
        return {str(channel): str(net) for channel, net in networks.items()}

    @abc.abstractmethod
    def connect_network(self, node: str, nic: str, network: str) -> None:
        """Attach ``network`` to the nic and wait until the switch has done it."""

    @abc.abstractmethod
    def detach_network(self, node: str, nic: str, network: str) -> None:
        """Detach ``network`` from the nic and wait until the switch has done it."""

    @abc.abstractmethod
    def power_cycle(self, node: str, force: bool = False) -> None:
        """Power the node on, or reset it if it is on."""

    @abc.abstractmethod
    def power_off(self, node: str) -> None:
        """Power the node off."""

    @abc.abstractmethod
    def set_boot_device(self, node: str, dev: str) -> None:
        """Set the next boot device (IPMI values: ``pxe``, ``disk``, ``none``)."""


def _find_nic(node_info: dict[str, Any], node: str, nic: str) -> dict[str, Any]:
    for entry in node_info.get("nics") or []:
        if isinstance(entry, dict) and entry.get("label") == nic:
            return entry
    raise NicNotFound(f"node {node} has no nic {nic!r} in HIL")


def _public_url(url: str) -> str:
    """The URL without any user:password part, safe for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class HILClient(NetIsolator):
    """Talks to HIL's v0 REST API with one user's credentials.

    :param url: HIL base URL, e.g. ``http://127.0.0.1:7000`` (``/v0`` is added unless present).
    :param timeout: seconds for every single HTTP request.
    :param action_timeout: seconds to wait for a networking action to finish.
    :param channel: the channel passed to connect_network.
    """

    def __init__(self, url: str, username: str, password: str, timeout: float = 10.0,
                 action_timeout: float = 60.0, channel: str = DEFAULT_CHANNEL) -> None:
        base = url.rstrip("/")
        if not base.endswith("/v0"):
            base += "/v0"
        self.base_url = base
        self.public_url = _public_url(base)
        self.username = username
        self.timeout = timeout
        self.action_timeout = action_timeout
        self.channel = channel
        self.session = _shared_session(base, username, password)

    @classmethod
    def from_config(cls, section: Any, username: str, password: str) -> HILClient:
        """Build from the ``[net_isolator]`` config section and a user's credentials."""
        return cls(section.url, username, password, timeout=float(section.timeout),
                   action_timeout=float(section.action_timeout), channel=section.channel)

    def close(self) -> None:
        """Nothing to release: the HTTP session is shared by the worker (see _shared_session)."""

    def __repr__(self) -> str:  # never shows the password
        return f"HILClient({self.public_url!r}, user={self.username!r})"

    # --- transport ---------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 context: dict[str, str] | None = None,
                 ok: tuple[int, ...] = (200, 202)) -> requests.Response:
        """One HTTP call; non-``ok`` statuses become BMI errors (see :meth:`_raise_for`)."""
        url = f"{self.base_url}/{path}"
        kwargs: dict[str, Any] = {"timeout": self.timeout}
        if body is not None:
            kwargs["data"] = json.dumps(body)
            kwargs["headers"] = {"Content-Type": "application/json"}
        try:
            resp = self.session.request(method, url, **kwargs)
        except requests.RequestException as exc:
            # The exception text can be long and carries the URL; the type is enough.
            raise HILUnavailable(f"cannot reach HIL at {self.public_url}: {type(exc).__name__}") from None
        LOG.debug("HIL %s /%s -> %s", method, path, resp.status_code)
        if resp.status_code not in ok:
            self._raise_for(resp, method, path, context or {})
        return resp

    def _raise_for(self, resp: requests.Response, method: str, path: str, context: dict[str, str]) -> None:
        status = resp.status_code
        hil_type, msg = _error_body(resp)
        where = f"{method} /v0/{path}"
        if not msg:
            msg = f"HIL answered {status} to {where}"
        if status == 401:
            project = context.get("project")
            if "access" in msg.lower() and project:
                raise AuthenticationFailed(f"no access to project {project} in HIL for user {self.username}")
            if "administrator" in msg.lower():
                raise AuthenticationFailed(f"HIL user {self.username} is not an administrator")
            if "access" in msg.lower():
                raise AuthenticationFailed(f"HIL user {self.username} has no access: {msg}")
            raise AuthenticationFailed(f"HIL authentication failed for user {self.username}")
        if status == 403:
            raise Forbidden(f"HIL refused {where}: {msg}")
        if status == 404:
            if hil_type is None:
                # An HTML page: the route does not exist (wrong URL or HIL version).
                raise NotFound(f"HIL has no route {where} (is {self.public_url} a HIL v0 API?)")
            match = _NOT_FOUND_RE.match(msg)
            kind = match.group(1) if match else context.get("kind", "")
            if kind == "User":
                raise AuthenticationFailed(f"HIL authentication failed: user {self.username} does not exist")
            if kind in ("Node", "node"):
                raise NodeNotFound(_hil_msg(msg, f"node {context.get('node', '')} not found in HIL"))
            if kind in ("Nic", "nic"):
                raise NicNotFound(_hil_msg(msg, f"nic {context.get('nic', '')} not found in HIL"))
            if kind in ("Project", "project"):
                raise ProjectNotFound(_hil_msg(msg, f"project {context.get('project', '')} not found in HIL"))
            raise NotFound(f"HIL: {msg}")
        if status == 409:
            raise Conflict(f"HIL: {msg}")
        if status == 400:
            raise InvalidInput(f"HIL rejected {where}: {msg}")
        if status >= 500:
            raise HILUnavailable(f"HIL failed ({status}) on {where}: {msg}")
        raise HILError(f"unexpected HIL answer {status} to {where}: {msg}", status=502)

    def _json(self, resp: requests.Response, what: str) -> Any:
        try:
            return json.loads(resp.text) if resp.text.strip() else None
        except ValueError:
            raise HILError(f"HIL sent a non-JSON answer for {what}", status=502) from None

    # --- reads -------------------------------------------------------------------------
    def authenticate(self) -> None:
        self._request("GET", "nodes/free")

    def is_admin(self) -> bool:
        try:
            self._request("GET", "projects")
        except AuthenticationFailed as exc:
            if "does not exist" in str(exc):
                raise
            return False
        return True

    def list_project_nodes(self, project: str) -> list[str]:
        validate_name(project, "project")
        resp = self._request("GET", f"project/{quote(project)}/nodes",
                             context={"kind": "project", "project": project})
        nodes = self._json(resp, f"the nodes of project {project}")
        if not isinstance(nodes, list):
            raise HILError(f"HIL sent a malformed node list for project {project}", status=502)
        return [str(n) for n in nodes]

    def show_node(self, node: str) -> dict[str, Any]:
        validate_name(node, "node")
        resp = self._request("GET", f"node/{quote(node)}", context={"kind": "node", "node": node})
        info = self._json(resp, f"node {node}")
        if not isinstance(info, dict):
            raise HILError(f"HIL sent a malformed record for node {node}", status=502)
        return info

    # --- networking --------------------------------------------------------------------
    def connect_network(self, node: str, nic: str, network: str) -> None:
        self._network_action("connect_network", node, nic, network,
                             {"network": network, "channel": self.channel}, attached=True)

    def detach_network(self, node: str, nic: str, network: str) -> None:
        self._network_action("detach_network", node, nic, network, {"network": network}, attached=False)

    def _network_action(self, verb: str, node: str, nic: str, network: str, body: dict[str, Any],
                        attached: bool) -> None:
        validate_name(node, "node")
        validate_name(nic, "nic")
        validate_name(network, "network")
        context = {"kind": "node", "node": node, "nic": nic, "network": network}
        resp = self._request("POST", f"node/{quote(node)}/nic/{quote(nic)}/{verb}", body, context)
        deadline = time.monotonic() + self.action_timeout
        status_id = None
        if resp.text.strip():
            reply = self._json(resp, verb)
            if isinstance(reply, dict) and reply.get("status_id"):
                status_id = str(reply["status_id"])
        if status_id is None:
            # HIL v0.2 (202 with no body) or HaaS v0.1 (200, synchronous): watch the nic.
            self._wait_attachment(node, nic, network, attached, deadline)
            return
        self._wait_action(status_id, node, nic, network, attached, deadline)

    def _wait_action(self, status_id: str, node: str, nic: str, network: str, attached: bool,
                     deadline: float) -> None:
        what = f"{'connect' if attached else 'detach'} network {network} {'to' if attached else 'from'} " \
               f"node {node} nic {nic}"
        delay = POLL_START
        while True:
            try:
                resp = self._request("GET", f"networking_action/{quote(status_id, safe='')}",
                                     context={"kind": "action", "node": node, "nic": nic})
            except NotFound:
                # A newer action on the nic deleted this record (hil-api.md §3.5): the
                # nic's actual attachment is the only truth left.
                if self._is_attached(node, nic, network) == attached:
                    return
                raise Conflict(f"could not {what}: HIL replaced the networking action by another one "
                               f"and the network is {'not ' if attached else ''}attached") from None
            reply = self._json(resp, "a networking action")
            state = reply.get("status") if isinstance(reply, dict) else None
            if state == "DONE":
                return
            if state == "ERROR":
                raise HILError(f"HIL could not {what}: the networking action {status_id} ended in ERROR",
                               status=502)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HILUnavailable(f"could not {what}: network action still pending after "
                                     f"{self.action_timeout:g} s")
            time.sleep(min(delay, remaining))
            delay = min(delay * POLL_FACTOR, POLL_CAP)

    def _wait_attachment(self, node: str, nic: str, network: str, attached: bool, deadline: float) -> None:
        delay = POLL_START
        while self._is_attached(node, nic, network) != attached:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HILUnavailable(f"network action on node {node} nic {nic} still pending after "
                                     f"{self.action_timeout:g} s")
            time.sleep(min(delay, remaining))
            delay = min(delay * POLL_FACTOR, POLL_CAP)

    def _is_attached(self, node: str, nic: str, network: str) -> bool:
        return network in self.nic_networks(node, nic).values()

    # --- power -------------------------------------------------------------------------
    def power_cycle(self, node: str, force: bool = False) -> None:
        validate_name(node, "node")
        self._request("POST", f"node/{quote(node)}/power_cycle", {"force": bool(force)},
                      {"kind": "node", "node": node})

    def power_off(self, node: str) -> None:
        validate_name(node, "node")
        # An empty JSON object: obmd (HIL master) rejects a POST without a JSON body.
        self._request("POST", f"node/{quote(node)}/power_off", {}, {"kind": "node", "node": node})

    def set_boot_device(self, node: str, dev: str) -> None:
        validate_name(node, "node")
        self._request("PUT", f"node/{quote(node)}/boot_device", {"bootdev": dev}, {"kind": "node", "node": node})


def _error_body(resp: requests.Response) -> tuple[str | None, str]:
    """``(type, msg)`` of a HIL error body; ``(None, "")`` for HTML or other non-JSON."""
    try:
        data = json.loads(resp.text)
    except ValueError:
        return None, ""
    if not isinstance(data, dict):
        return None, ""
    return str(data.get("type") or "HILError"), str(data.get("msg") or "")[:500]


def _hil_msg(msg: str, fallback: str) -> str:
    return f"HIL: {msg}" if msg else fallback


__all__ = ["HILClient", "NetIsolator"]

"""The CLI's only way to BMI: HTTP to Picasso's /v1 JSON API.  No Ceph, DB or Einstein imports here."""
from __future__ import annotations

import configparser
import os
from typing import Any

import click
import requests

DEFAULT_URL = "http://127.0.0.1:9000"
DEFAULT_CONFIG = "/etc/bmi/bmiconfig.cfg"
USER_VARS = ("HIL_USERNAME", "HAAS_USERNAME")
PASSWORD_VARS = ("HIL_PASSWORD", "HAAS_PASSWORD")
TIMEOUT_SECONDS = 3600.0  # provisioning and imports can be slow; never hang forever
CA_VAR = "BMI_CA_BUNDLE"
CA_META = "bmi.ca"  # where the global --ca option leaves its value (click's ctx.meta)


def remember_ca(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Callback of the global ``--ca PATH`` option."""
    if value:
        ctx.meta[CA_META] = value
    return value


def ca_bundle() -> str | None:
    """The CA certificates that sign BMI's certificate: ``--ca``, else BMI_CA_BUNDLE, else None (the
    system's trusted CAs).  An https:// URL is always verified; this only says against what."""
    ctx = click.get_current_context(silent=True)
    path = (ctx.meta.get(CA_META) if ctx is not None else None) or os.environ.get(CA_VAR) or None
    if path is not None and not os.path.isfile(path):
        raise click.ClickException(f"CA bundle {path} (--ca or {CA_VAR}) is not a readable file")
    return path


def server_url() -> str:
    """BMI_URL, else the config file's [rest_api] ip/port, else the default."""
    url = os.environ.get("BMI_URL")
    if url:
        return url.rstrip("/")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(os.environ.get("BMI_CONFIG") or DEFAULT_CONFIG, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return DEFAULT_URL
    if parser.has_section("rest_api"):
        ip = parser.get("rest_api", "ip", fallback="127.0.0.1").strip() or "127.0.0.1"
        port = parser.get("rest_api", "port", fallback="9000").strip() or "9000"
        host = f"[{ip}]" if ":" in ip else ip
        scheme = "https" if parser.get("rest_api", "certfile", fallback="").strip() else "http"
        return f"{scheme}://{host}:{port}"
    return DEFAULT_URL


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def credentials() -> tuple[str, str]:
    user = _env(USER_VARS)
    if user is None:
        raise click.ClickException("HIL_USERNAME is not set (export your HIL username as HIL_USERNAME; "
                                   "HAAS_USERNAME is accepted too)")
    password = _env(PASSWORD_VARS)
    if password is None:
        raise click.ClickException("HIL_PASSWORD is not set (export your HIL password as HIL_PASSWORD; "
                                   "HAAS_PASSWORD is accepted too)")
    return user, password


class Api:
    """Calls /v1; returns the ``result`` of a 2xx answer, raises ClickException (exit 1) otherwise."""

    def __init__(self, url: str, auth: tuple[str, str], ca: str | None = None) -> None:
        self.url = url
        # Sent as UTF-8 bytes (RFC 7617): requests would encode str as Latin-1 and crash on anything
        # else.  surrogateescape gives back the exact bytes of an environment value that is not UTF-8;
        # the server answers 401 for credentials it cannot use.
        self.auth = (auth[0].encode("utf-8", "surrogateescape"), auth[1].encode("utf-8", "surrogateescape"))
        self.session = requests.Session()
        # Certificates are always verified; a private CA comes from --ca / BMI_CA_BUNDLE.  Passed on each
        # request: requests lets REQUESTS_CA_BUNDLE override a Session's verify, never a request's own path.
        self.verify: str | bool = ca or ca_bundle() or True

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                params: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Any:
        try:
            resp = self.session.request(method, f"{self.url}/v1{path}", json=body, params=params, auth=self.auth,
                                        timeout=TIMEOUT_SECONDS, verify=self.verify, headers=headers)
        except requests.exceptions.SSLError as exc:
            raise click.ClickException(_tls_message(self.url, exc)) from None
        except requests.ConnectionError as exc:
            if "Connection aborted" in str(exc) and self.url.startswith("http://"):
                # A TLS server drops a plain-HTTP request (cheroot resets it, or answers 400, below).
                raise click.ClickException(f"BMI at {self.url} closed the connection: if it serves HTTPS, use an "
                                           "https:// URL (BMI_URL)") from None
            raise click.ClickException(f"cannot reach BMI at {self.url} (is Picasso running? "
                                       "set BMI_URL or [rest_api] in the config)") from None
        except requests.Timeout:
            raise click.ClickException(f"BMI at {self.url} did not answer in time") from None
        if resp.status_code == 204:
            return None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if 200 <= resp.status_code < 300:
            return data.get("result") if isinstance(data, dict) else data
        raise failure(resp, self.url, data)

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Any:
        return self.request("POST", path, body=body or {}, headers=headers)

    def delete(self, path: str, headers: dict[str, str] | None = None) -> Any:
        return self.request("DELETE", path, headers=headers)


def failure(resp: requests.Response, url: str, data: Any = None,
            special: dict[int, str] | None = None) -> click.ClickException:
    """The error of a non-2xx answer: Picasso's JSON error message, else ``special[status]`` (a caller's
    message for a status the web server itself answers), else what the answer shows."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return click.ClickException(str(data["error"].get("message") or f"HTTP {resp.status_code}"))
    if special and resp.status_code in special:
        return click.ClickException(special[resp.status_code])
    if resp.status_code == 400 and "only speaks HTTPS" in resp.text[:500]:  # cheroot's answer to plain HTTP
        return click.ClickException(f"BMI at {url} serves HTTPS only: use an https:// URL (BMI_URL)")
    # A plain-text answer (the legacy API's errors, a proxy's, waitress's own 413) is shown as it is.
    text = resp.text.strip()[:500] if resp.headers.get("Content-Type", "").startswith("text/plain") else ""
    return click.ClickException(f"BMI at {url} answered HTTP {resp.status_code}{': ' + text if text else ''}")


def _tls_message(url: str, exc: Exception) -> str:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0].strip(" )'\"") \
            if "certificate verify failed:" in text else "certificate verify failed"
        return (f"cannot verify the TLS certificate of BMI at {url} ({reason}): give the CA that signed it with "
                f"--ca PATH or {CA_VAR}")
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return f"BMI at {url} does not speak TLS on that port (is it plain HTTP? check BMI_URL)"
    return f"TLS connection to BMI at {url} failed: {text[:300]}"

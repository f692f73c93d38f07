"""Picasso over HTTPS as REAL processes (Einstein with the test ops factory, as test_drain_real), with a
throwaway CA made by `openssl` in a temporary directory; JSON log lines from both servers.

The `bmi` CLI verifies the certificate: with the CA (``--ca`` or ``BMI_CA_BUNDLE``) it works, without it
(or with another CA) it fails with a clear message and exit 1; plain HTTP to the TLS port is refused.
The legacy form API and /v1 answer over TLS as over HTTP; a large body is a JSON 413; SIGTERM drains.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ims.common.process import execute
from tests.integration.test_drain_real import ENV, ROOT, Einstein, in_thread, wait_until

pytestmark = pytest.mark.integration

BMI = str(ROOT / ".venv" / "bin" / "bmi")
ALICE = ("alice", "alice-pw")


def make_ca(d: Path, name: str) -> Path:
    """A CA certificate (and key) named ``name`` in ``d``: returns the certificate's path."""
    execute("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"),
            "-out", str(d / f"{name}.pem"), "-days", "2", "-subj", f"/CN=BMI test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return d / f"{name}.pem"


def make_server_cert(d: Path, ca: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by the CA ``ca`` (see make_ca)."""
    (d / "server.ext").write_text("subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n"
                                  "basicConstraints = CA:FALSE\n")
    execute("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "server.key"),
            "-out", str(d / "server.csr"), "-subj", "/CN=127.0.0.1")
    execute("openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / f"{ca}.pem"),
            "-CAkey", str(d / f"{ca}.key"), "-CAcreateserial", "-out", str(d / "server.pem"), "-days", "2",
            "-extfile", str(d / "server.ext"))
    os.chmod(d / "server.key", 0o600)
    return d / "server.pem", d / "server.key"


class Servers:
    """Einstein (1 worker, the test ops factory) and Picasso with TLS, both with [logs] format = json."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        pki = tmp / "pki"
        pki.mkdir()
        self.ca = make_ca(pki, "ca")
        self.other_ca = make_ca(pki, "other-ca")
        cert, key = make_server_cert(pki, "ca")
        # The Einstein helper writes the config and starts; it is restarted here with the final config.
        first = Einstein(tmp, workers=1)
        first.stop()
        self.ns = first
        self.port = first.rest_port
        self.cfg_path = first.cfg_path
        text = self.cfg_path.read_text()
        text = text.replace("[rest_api]\n", f"[rest_api]\ncertfile = {cert}\nkeyfile = {key}\n"
                                            "max_body_bytes = 4096\n")
        self.cfg_path.write_text(text.replace("[logs]\n", "[logs]\nformat = json\n"))
        for old in (tmp / "logs").glob("*.log*"):
            old.unlink()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outs = []
        self.einstein = self._start("einstein_server", "--ops-factory", "tests.support.journal_ops:build")
        wait_until("the worker to register", lambda: len(first.registered()) >= 1, log=self.logtext)
        self.picasso = self._start("picasso_server")
        self.url = f"https://127.0.0.1:{self.port}"
        wait_until("picasso to listen", self.up, log=self.logtext)

    def _start(self, script: str, *extra: str) -> subprocess.Popen[bytes]:
        out = open(self.dir / f"{script}.out", "w+")  # noqa: SIM115 - closed in stop()
        self.outs.append(out)
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / script), "--config", str(self.cfg_path),
                                 *extra], stdout=out, stderr=subprocess.STDOUT, env=ENV)
        self.procs.append(proc)
        return proc

    def logtext(self) -> str:
        return "\n".join(Path(o.name).read_text() for o in self.outs)

    def up(self) -> bool:
        try:
            return requests.get(self.url + "/v1/projects/proj1/images", auth=ALICE, verify=str(self.ca),
                                timeout=30).status_code == 200
        except requests.RequestException:
            return False

    def bmi(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        full = {**os.environ, "BMI_URL": self.url, "HIL_USERNAME": ALICE[0], "HIL_PASSWORD": ALICE[1], **env}
        full.pop("BMI_CONFIG", None)
        if "BMI_CA_BUNDLE" not in env:
            full.pop("BMI_CA_BUNDLE", None)
        return subprocess.run([BMI, *args], capture_output=True, text=True, env=full, timeout=120, check=False)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        for out in self.outs:
            out.close()


@pytest.fixture()
def servers(tmp_path: Path):
    s = Servers(tmp_path)
    yield s
    for path in tmp_path.glob("started-*"):
        (tmp_path / path.name.replace("started-", "release-")).write_text("")
    s.stop()


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    assert lines, f"{path} is empty"
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_https_cli_verification_apis_limits_drain_and_json_logs(servers: Servers) -> None:
    s = servers
    # --- the CLI verifies the certificate ------------------------------------------------
    ok = s.bmi("--ca", str(s.ca), "ls", "proj1")
    assert ok.returncode == 0 and "golden" in ok.stdout, ok.stderr
    assert s.bmi("ls", "proj1", BMI_CA_BUNDLE=str(s.ca)).returncode == 0
    for failed in (s.bmi("ls", "proj1"), s.bmi("--ca", str(s.other_ca), "ls", "proj1")):
        assert failed.returncode == 1
        assert "cannot verify the TLS certificate of BMI at https://127.0.0.1" in failed.stderr, failed.stderr
        assert "--ca PATH or BMI_CA_BUNDLE" in failed.stderr and "Traceback" not in failed.stderr
    missing = s.bmi("--ca", str(s.dir / "nope.pem"), "ls", "proj1")
    assert missing.returncode == 1 and "is not a readable file" in missing.stderr, missing.stderr
    # --- plain HTTP to the TLS port is refused ----------------------------------------------
    plain_url = f"http://127.0.0.1:{s.port}"
    try:  # cheroot resets a plain-HTTP connection (some versions answer 400 first): never an answer
        plain = requests.get(plain_url + "/v1/projects/proj1/images", auth=ALICE, timeout=30)
        assert plain.status_code == 400 and "golden" not in plain.text
    except requests.ConnectionError:
        pass
    http_cli = s.bmi("ls", "proj1", BMI_URL=plain_url)
    assert http_cli.returncode == 1 and "https:// URL" in http_cli.stderr, http_cli.stderr
    assert "golden" not in http_cli.stdout
    # and nothing but TLS 1.2+ is spoken
    ctx = ssl.create_default_context(cafile=str(s.ca))
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # --- /v1 and the legacy form API over TLS -------------------------------------------------
    v1 = requests.get(s.url + "/v1/projects/proj1/images", auth=ALICE, verify=str(s.ca), timeout=30)
    assert v1.status_code == 200 and "golden" in v1.json()["result"]
    denied = requests.get(s.url + "/v1/projects/proj1/images", auth=("alice", "wrong"), verify=str(s.ca), timeout=30)
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "AuthenticationFailed"
    legacy = requests.post(s.url + "/list_images/", data={"project": "proj1"}, auth=ALICE, verify=str(s.ca),
                           timeout=30)
    assert legacy.status_code == 200 and "golden" in legacy.text, legacy.text
    # --- a body over [rest_api] max_body_bytes: the app's JSON 413, with and without Content-Length ---------
    big = requests.post(s.url + "/v1/projects/proj1/images", data=b"x" * 5000, auth=ALICE, verify=str(s.ca),
                        headers={"Content-Type": "application/json"}, timeout=30)
    assert big.status_code == 413 and big.json()["error"]["type"] == "PayloadTooLarge"
    chunked = requests.post(s.url + "/v1/projects/proj1/images", data=iter([b"x" * 3000, b"x" * 3000]),
                            auth=ALICE, verify=str(s.ca), headers={"Content-Type": "application/json"}, timeout=30)
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "PayloadTooLarge"
    # --- /metrics over TLS ----------------------------------------------------------------------
    text = requests.get(s.url + "/metrics", verify=str(s.ca), timeout=30).text
    got = {(m.name, tuple(sorted(m.labels.items()))): m.value
           for f in text_string_to_metric_families(text) for m in f.samples}
    assert got[("bmi_einstein_up", ())] == 1.0
    assert got[("bmi_requests_total", (("api", "v1"), ("status", "413"), ("verb", "import_image")))] == 2.0
    # --- SIGTERM drains: a held legacy provision is answered, new connections are refused --------------
    form = urllib.parse.urlencode({"project": "proj1", "node": "node2", "img": "golden", "network": "net",
                                   "nic": "eno1"})
    auth = "Basic " + base64.b64encode(b"alice:alice-pw").decode()

    def provision() -> tuple[int, str]:
        r = requests.put(s.url + "/provision/", data=form, verify=str(s.ca), timeout=120, headers={
            "Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"})
        return r.status_code, r.text

    thread, result = in_thread(provision)
    wait_until("the held provision to start", lambda: (s.dir / "started-provision-node2").exists())
    s.picasso.send_signal(signal.SIGTERM)
    wait_until("picasso to stop listening", lambda: not s.up())
    assert s.picasso.poll() is None and thread.is_alive(), result
    (s.dir / "release-provision-node2").write_text("")
    thread.join(60)
    assert result.get("result") == (200, "Success"), result
    assert s.picasso.wait(90) == 0
    # --- JSON log lines: Picasso's own file and Einstein's single writer (workers included) -------------
    picasso = json_lines(s.dir / "logs" / "picasso.log")
    messages = [e["message"] for e in picasso]
    assert any(m.startswith(f"Picasso listening on https://127.0.0.1:{s.port}/") for m in messages), messages
    assert "finishing requests in flight" in " ".join(messages) and "Picasso stopped" in messages
    assert {e["component"] for e in picasso} == {"picasso"}
    # cheroot's own reports (a client that refused the certificate, plain HTTP) land there too
    assert any("plain HTTP" in m for m in messages) and any("during handshake" in m for m in messages), messages
    s.einstein.send_signal(signal.SIGTERM)
    assert s.einstein.wait(90) == 0
    einstein = json_lines(s.dir / "logs" / "ims.log")
    components = {e["component"] for e in einstein}
    assert "einstein" in components and "einstein.0" in components, components
    assert all({"time", "level", "logger", "message", "pid"} <= set(e) for e in einstein)
    # a worker's audit line, sent to the supervisor as an already formatted JSON line
    assert any(e["component"] == "einstein.0" and " by alice ok in " in e["message"] for e in einstein), einstein
    # never a password, in any log line
    for path in (s.dir / "logs").iterdir():
        assert "alice-pw" not in path.read_text()


def test_picasso_refuses_to_start_with_an_unusable_certificate(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki, "ca")
    cert, _key = make_server_cert(pki, "ca")
    (pki / "other.key").write_text("not a key\n")
    base = ("[bmi]\nuid = t\n[net_isolator]\nurl = http://127.0.0.1:1\n[iscsi]\nip = 127.0.0.1\n"
            f"[logs]\npath = {tmp_path}/logs\n[rest_api]\nip = 127.0.0.1\nport = 1\n")
    missing = pki / "missing.key"
    cases = {f"certfile = {cert}\nkeyfile = {missing}\n": f"[rest_api] keyfile {missing}: file not found",
             f"certfile = {cert}\nkeyfile = {pki}/other.key\n": "cannot load the certificate and key",
             f"certfile = {cert}\n": "[rest_api] certfile and keyfile go together"}
    for extra, message in cases.items():
        cfg = tmp_path / "bmi.cfg"
        cfg.write_text(base + extra)
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "picasso_server"), "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60, env=ENV, check=False)
        assert proc.returncode == 1 and message in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr and "Einstein" not in proc.stderr  # nothing asked Einstein

"""The stack env file's `hil` helper follows HIL's 307 to obmd (real HIL answers power actions so) with the
same method and body, and does not hand the HIL password to obmd.  Two real HTTP servers on 127.0.0.1
stand for HIL and obmd; the helper runs in bash, as a user's shell sources it."""
from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import load_script

ROOT = Path(__file__).resolve().parents[2]


def _bmi_stack() -> Any:
    return load_script("bmi_stack.py", "bmi_stack_under_test")


class _Server:
    def __init__(self, handle: Any) -> None:
        calls: list[dict[str, Any]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                calls.append({"method": "POST", "path": self.path, "body": body,
                              "auth": self.headers.get("Authorization")})
                handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.calls = calls
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def hil_and_obmd() -> Iterator[tuple[_Server, _Server]]:
    def obmd_answer(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "0")
        h.end_headers()

    obmd = _Server(obmd_answer)

    def hil_answer(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(307)
        h.send_header("Location", f"http://127.0.0.1:{obmd.port}/node/bmi_node/power_cycle?token=t0k3n")
        h.send_header("Content-Length", "0")
        h.end_headers()

    hil = _Server(hil_answer)
    yield hil, obmd
    hil.close()
    obmd.close()


def test_hil_helper_follows_the_redirect_to_obmd(hil_and_obmd: tuple[_Server, _Server]) -> None:
    hil, obmd = hil_and_obmd
    helper = _bmi_stack().hil_helper(None)
    script = f'{helper}\nhil -X POST -d \'{{"force": true}}\' "http://127.0.0.1:{hil.port}/v0/node/bmi_node/power_cycle"'
    proc = subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin", "HIL_USERNAME": "haas",
                                                        "HIL_PASSWORD": "secret"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert [c["path"] for c in hil.calls] == ["/v0/node/bmi_node/power_cycle"]
    assert hil.calls[0]["auth"] and hil.calls[0]["auth"].startswith("Basic ")
    # the power action reached obmd: same method and body; the HIL password stayed with HIL
    assert [(c["method"], c["path"], c["body"]) for c in obmd.calls] == \
        [("POST", "/node/bmi_node/power_cycle?token=t0k3n", b'{"force": true}')]
    assert obmd.calls[0]["auth"] is None


def test_hil_helper_in_the_boot_network_runs_in_its_namespace() -> None:
    helper = _bmi_stack().hil_helper("bmi-boot")
    assert helper.startswith("hil() { ip netns exec bmi-boot curl ") and " -L " in helper
    assert "--location-trusted" not in helper

"""The CLI's TLS settings: the scheme from the config file, the CA bundle from --ca or BMI_CA_BUNDLE."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from ims.cli import api
from ims.cli.main import cli


def test_url_is_https_when_the_config_has_a_certificate(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "bmi.cfg"
    cfg.write_text("[rest_api]\nip = 127.0.0.1\nport = 9443\ncertfile = /etc/bmi/cert.pem\nkeyfile = /k\n")
    monkeypatch.delenv("BMI_URL", raising=False)
    monkeypatch.setenv("BMI_CONFIG", str(cfg))
    assert api.server_url() == "https://127.0.0.1:9443"
    cfg.write_text("[rest_api]\nip = 127.0.0.1\nport = 9000\n")
    assert api.server_url() == "http://127.0.0.1:9000"


def test_ca_option_wins_over_the_environment_and_a_missing_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    opt, env = tmp_path / "opt.pem", tmp_path / "env.pem"
    opt.write_text("x")
    env.write_text("x")
    seen: list[object] = []

    def capture(self: api.Api, method: str, path: str, body=None, params=None):  # noqa: ANN001
        seen.append(self.verify)
        return []

    monkeypatch.setattr(api.Api, "request", capture)
    base = {"HIL_USERNAME": "alice", "HIL_PASSWORD": "pw", "BMI_URL": "https://127.0.0.1:1",
            "REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt"}
    runner = CliRunner()
    assert runner.invoke(cli, ["--ca", str(opt), "ls", "p"], env=base).exit_code == 0
    assert runner.invoke(cli, ["ls", "p"], env={**base, "BMI_CA_BUNDLE": str(env)}).exit_code == 0
    assert runner.invoke(cli, ["--ca", str(opt), "ls", "p"], env={**base, "BMI_CA_BUNDLE": str(env)}).exit_code == 0
    assert runner.invoke(cli, ["ls", "p"], env={**base, "BMI_CA_BUNDLE": ""}).exit_code == 0
    assert seen == [str(opt), str(env), str(opt), True]
    bad = runner.invoke(cli, ["--ca", str(tmp_path / "nope.pem"), "ls", "p"], env=base)
    assert bad.exit_code == 1 and "is not a readable file" in bad.output
    assert "--ca PATH" in runner.invoke(cli, ["--help"]).output

"""The deploy files agree with the code: the example config loads and lists every section and key of
ims.common.config, and the systemd units start console scripts the package declares."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from ims.common import config as bmi_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "bmiconfig.example.cfg"


def test_example_config_loads_and_lists_every_key() -> None:
    cfg = bmi_config.load(path=str(EXAMPLE))
    assert cfg.db_url == "sqlite:////var/lib/bmi/bmi.db" and cfg.rest_api.port == 9000
    text = EXAMPLE.read_text()
    sections = re.split(r"^\[([a-z_]+)\]$", text, flags=re.MULTILINE)
    body = dict(zip(sections[1::2], sections[2::2], strict=True))
    assert set(body) == set(bmi_config.SCHEMA), set(body) ^ set(bmi_config.SCHEMA)
    for section, keys in bmi_config.SCHEMA.items():
        listed = set(re.findall(r"^#? ?([a-z_]+) =", body[section], flags=re.MULTILINE))
        assert set(keys) <= listed, (section, set(keys) - listed)


def test_units_start_the_declared_console_scripts() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"bmi", "bmi-einstein", "bmi-picasso", "bmi-manage"} <= set(scripts)
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        commands = re.findall(r"^ExecStart(?:Pre)?=(\S+)", unit.read_text(), flags=re.MULTILINE)
        assert commands, unit
        for command in commands:
            assert command.startswith("/opt/bmi/venv/bin/") and command.rsplit("/", 1)[1] in scripts, command


def test_manage_reconcile_needs_an_admin(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from ims import manage

    for var in ("HIL_USERNAME", "HAAS_USERNAME", "HIL_PASSWORD", "HAAS_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    cfg = tmp_path / "bmi.cfg"
    cfg.write_text(EXAMPLE.read_text().replace("/var/lib/bmi/bmi.db", str(tmp_path / "bmi.db")))
    assert manage.main(["--config", str(cfg), "reconcile"]) == 1
    assert "reconcile needs a BMI admin" in capsys.readouterr().err
    assert not (tmp_path / "bmi.db").exists()  # refused before anything was opened
    assert manage.main(["--config", str(cfg), "db", "upgrade"]) == 0
    assert (tmp_path / "bmi.db").exists()
    assert manage.main(["--config", str(tmp_path / "missing.cfg"), "db", "upgrade"]) == 1

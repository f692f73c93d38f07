"""``[logs] format = json``: one JSON object per line, whole, through the supervisor's single writer too."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ims.common import config as bmi_config
from ims.common import log as bmi_log
from ims.common.errors import ConfigError
from ims.common.process import execute

ROOT = Path(__file__).resolve().parents[2]
PROCS = 3
RECORDS = 300

WRITER = """
import logging, sys
sys.path.insert(0, sys.argv[1])
from ims.common import config, log
cfg = config.parse(sys.argv[2])
log.setup(cfg, "einstein." + sys.argv[3], forward_to=sys.argv[4])
logger = logging.getLogger("ims.test")
for i in range(int(sys.argv[5])):
    logger.info("proc=%s rec=%d two\\nlines \\"quoted\\"", sys.argv[3], i)
try:
    raise ValueError("boom")
except ValueError:
    logger.exception("failed in proc %s", sys.argv[3])
"""


def _cfg(tmp_path: Path, fmt: str = "json") -> bmi_config.BMIConfig:
    path = tmp_path / "bmi.cfg"
    path.write_text(f"[bmi]\nuid = t\n[net_isolator]\nurl = http://127.0.0.1:1\n[iscsi]\nip = 127.0.0.1\n"
                    f"[logs]\npath = {tmp_path}/logs\nmax_bytes = 50000\nbackup_count = 100\nformat = {fmt}\n"
                    "debug = true\n")
    return bmi_config.parse(str(path))


@pytest.fixture()
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def lines(tmp_path: Path, pattern: str) -> list[dict]:
    out = []
    for f in sorted((tmp_path / "logs").glob(pattern)):
        out += [json.loads(line) for line in f.read_text().splitlines()]  # each line parses on its own
    return out


def test_worker_records_reach_the_single_writer_as_whole_json_lines(tmp_path: Path, restore_root: None) -> None:
    cfg = _cfg(tmp_path)
    handler = bmi_log.setup(cfg, "einstein")
    assert handler is not None
    receiver = bmi_log.LogReceiver(handler).start()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), cfg.path, str(n), receiver.address,
                               str(RECORDS)], stderr=subprocess.DEVNULL) for n in range(PROCS)]
    logging.getLogger("ims.test").warning("the supervisor's own record")
    assert [p.wait(120) for p in procs] == [0] * PROCS
    receiver.stop()
    handler.close()
    assert len(list((tmp_path / "logs").glob("ims.log*"))) > 2  # rotated: still whole lines
    entries = lines(tmp_path, "ims.log*")
    assert len(entries) == PROCS * (RECORDS + 1) + 1
    for n in range(PROCS):
        mine = [e for e in entries if e["component"] == f"einstein.{n}"]
        assert sorted(e["message"] for e in mine if e["message"].startswith("proc=")) == sorted(
            f'proc={n} rec={i} two\nlines "quoted"' for i in range(RECORDS))
        failed = [e for e in mine if e["level"] == "ERROR"]
        assert len(failed) == 1 and failed[0]["message"] == f"failed in proc {n}"
        assert "ValueError: boom" in failed[0]["exception"] and "Traceback" in failed[0]["exception"]
        assert all(e["logger"] == "ims.test" and e["time"].endswith("+00:00") for e in mine)
    own = [e for e in entries if e["component"] == "einstein"]
    assert [(e["level"], e["message"]) for e in own] == [("WARNING", "the supervisor's own record")]


def test_picasso_json_file_and_masked_commands(tmp_path: Path, restore_root: None) -> None:
    cfg = _cfg(tmp_path)
    handler = bmi_log.setup(cfg, "picasso", file_name=bmi_log.PICASSO_LOG)
    assert handler is not None
    # commands are logged (DEBUG) with their secret-looking values masked, in JSON as in text
    execute(sys.executable, "-c", "pass", "--password=hunter2", "chap_secret", "s3cr3t")
    handler.close()
    entries = lines(tmp_path, "picasso.log")
    cmd = [e for e in entries if e["logger"] == "ims.common.process"]
    assert cmd and all(e["component"] == "picasso" and e["level"] == "DEBUG" for e in cmd)
    text = (tmp_path / "logs" / "picasso.log").read_text()
    assert "hunter2" not in text and "s3cr3t" not in text and "password=***" in text


def test_text_stays_the_default_and_the_format_is_checked(tmp_path: Path, restore_root: None) -> None:
    cfg = _cfg(tmp_path, fmt="text")
    assert not isinstance(bmi_log.formatter(cfg, "picasso"), bmi_log.JsonFormatter)
    assert not isinstance(bmi_log.formatter(None, "picasso"), bmi_log.JsonFormatter)
    assert bmi_config.parse("t.cfg", text="[bmi]\nuid = t\n[net_isolator]\nurl = x\n[iscsi]\nip = 1.2.3.4\n"
                            ).logs.format == "text"
    with pytest.raises(ConfigError, match=r"\[logs\] format: use text or json"):
        _cfg(tmp_path, fmt="xml")

"""Logs with several processes: every record lands exactly once and whole, across many rollovers."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from ims.common import config as bmi_config
from ims.common import log as bmi_log

ROOT = Path(__file__).resolve().parents[2]
PROCS = 4
RECORDS = 1500
PAD = "x" * 80  # long records make many rollovers

WRITER = """
import logging, sys
sys.path.insert(0, sys.argv[1])
from ims.common import config, log
cfg = config.parse(sys.argv[2])
log.setup(cfg, "einstein." + sys.argv[3], forward_to=sys.argv[4])
logger = logging.getLogger("ims.test")
for i in range(int(sys.argv[5])):
    logger.info("proc=%s rec=%d %s", sys.argv[3], i, sys.argv[6])
"""

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} einstein(?:\.(\d))? INFO ims\.test: "
                  r"proc=(\d) rec=(\d+) (x+)$")


def _cfg(tmp_path: Path) -> bmi_config.BMIConfig:
    path = tmp_path / "bmi.cfg"
    path.write_text(f"[bmi]\nuid = t\n[net_isolator]\nurl = http://127.0.0.1:1\n[iscsi]\nip = 127.0.0.1\n"
                    f"[logs]\npath = {tmp_path}/logs\nmax_bytes = 20000\nbackup_count = 200\n")
    return bmi_config.parse(str(path))


def test_records_of_several_processes_survive_rollover_exactly_once(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        handler = bmi_log.setup(cfg, "einstein")
        assert handler is not None
        receiver = bmi_log.LogReceiver(handler).start()
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), cfg.path, str(n), receiver.address,
                                   str(RECORDS), PAD], stderr=subprocess.DEVNULL) for n in range(PROCS)]
        logging.getLogger("ims.test").info("proc=9 rec=0 %s", PAD)  # the supervisor's own record
        assert [p.wait(120) for p in procs] == [0] * PROCS
        receiver.stop()
        handler.close()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    files = sorted((tmp_path / "logs").glob("ims.log*"))
    assert len(files) > 20, files  # the test really crossed many rollovers
    assert max(f.stat().st_size for f in files) <= 20000
    seen: dict[tuple[int, int], int] = {}
    for f in files:
        for line in f.read_text().splitlines():
            m = LINE.match(line)
            if m is None:
                assert line.startswith(tuple("0123456789")) and " einstein " in line, f"garbled: {line!r}"
                continue
            assert m.group(4) == PAD, f"garbled: {line!r}"
            assert m.group(1) == (None if m.group(2) == "9" else m.group(2)), line
            key = (int(m.group(2)), int(m.group(3)))
            seen[key] = seen.get(key, 0) + 1
    expected = {(n, i) for n in range(PROCS) for i in range(RECORDS)} | {(9, 0)}
    assert set(seen) == expected, sorted(expected - set(seen))[:10]
    assert set(seen.values()) == {1}


def test_picasso_writes_its_own_file(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        handler = bmi_log.setup(cfg, "picasso", file_name=bmi_log.PICASSO_LOG)
        logging.getLogger("ims.test").info("hello from picasso")
        assert handler is not None
        handler.close()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    assert "picasso INFO ims.test: hello from picasso" in (tmp_path / "logs" / "picasso.log").read_text()
    assert not (tmp_path / "logs" / "ims.log").exists()

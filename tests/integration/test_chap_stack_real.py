"""CHAP through the running service (scripts/bmi-stack: Ceph, tgtd, HIL simulator, Einstein workers,
Picasso): `bmi pro` gives the node a secret that is on its tgt target and in its iPXE script and nowhere
a user or an operator reading logs can see it — not in any CLI or REST answer, not in Einstein's or
Picasso's logs (with their per-call audit lines); `bmi dpro` deletes the tgt account."""
from __future__ import annotations

import configparser
import os
import sqlite3
import stat
from pathlib import Path

import pytest
import requests

from tests.support import iscsi_rw
from tests.support.stack import running_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ADMIN = ("haasadmin", "admin1234")
USER = ("haas", "secret")


def test_chap_secret_reaches_only_the_target_and_the_boot_script() -> None:
    with running_stack() as s:
        cfg = configparser.ConfigParser(interpolation=None)
        cfg.read(s.env["BMI_CONFIG"])
        s.rbd("create", "chap-image", "--size", "1", "--image-format", "2")
        assert s.bmi("import", "bmi_infra", "chap-image").stdout == "Success\n"
        assert s.bmi("pro", "bmi_infra", "bmi_node", "chap-image", "bmi_network", "bmi_port").stdout == "Success\n"

        with sqlite3.connect(cfg.get("db", "path")) as db:
            image_id, secret = db.execute("SELECT id, chap_secret FROM image WHERE name = 'bmi_node'").fetchone()
        assert secret and len(secret) == 16
        clone = f"{cfg.get('bmi', 'uid')}img{image_id}"
        conf = Path(cfg.get("iscsi", "conf_dir")) / f"{clone}.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and iscsi_rw.conf_chap(conf) == (clone, secret)
        script = (Path(cfg.get("tftp", "ipxe_path")) / "bmi_node.ipxe").read_text()
        assert f"set username {clone}\n" in script and f"set password {secret}\n" in script
        assert clone in s.tgtadm("--op", "show", "--mode", "account")

        # every answer a tenant or an admin gets
        answers = [s.bmi(*args, user=who).stdout for args, who in [
            (("db", "ls"), USER), (("--json", "db", "ls"), USER), (("showpro", "bmi_infra"), USER),
            (("ls", "bmi_infra"), USER), (("op", "ls"), USER), (("reconcile",), ADMIN)]]
        for path in ("/v1/db/images", "/v1/operations", "/v1/projects/bmi_infra/nodes"):
            r = requests.get(s.url + path, auth=USER, timeout=60)
            answers.append(f"{r.status_code} {r.text}")
        assert all(secret not in a for a in answers)

        assert s.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port").stdout == "Success\n"
        assert clone not in s.tgtadm("--op", "show", "--mode", "account")
        assert not conf.exists()

        logs = [p for p in Path(cfg.get("logs", "path")).rglob("*") if p.is_file()]
        assert logs, "the stack wrote no logs"
        text = "".join(p.read_text(errors="replace") for p in logs)
        assert "provision by haas queued" in text and "submit by haas ok" in text, "no audit lines: nothing checked"
        assert secret not in text
        with sqlite3.connect(cfg.get("db", "path")) as db:
            journal = " ".join(str(r) for r in db.execute("SELECT args, steps, error FROM operation").fetchall())
            tasks = " ".join(str(r) for r in db.execute("SELECT args, result, error FROM task").fetchall())
        assert journal and secret not in journal and secret not in tasks
        assert not [p for p in Path(cfg.get("tftp", "ipxe_path")).rglob("*.ipxe")
                    if secret in p.read_text(errors="replace")]
        assert os.path.exists(cfg.get("db", "path"))

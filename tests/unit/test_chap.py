"""CHAP: secrets, the tgt conf / show formats, the iPXE script, and where the secret goes in a provision
(in-memory drivers; tests/integration/test_chap_real.py logs in through real tgtd + libiscsi)."""
from __future__ import annotations

import json
import os
import re
import stat

import pytest
from sqlalchemy import select

from ims.common.errors import InvalidInput
from ims.database.models import Image, Operation
from ims.einstein.boot import BootFiles
from ims.einstein.iscsi import chap
from ims.einstein.iscsi.tgt_conf import TargetSpec, parse_conf, parse_show, render_conf
from ims.einstein.storage.base import Backing
from tests.unit.test_operations import ADMIN, MAC, USER, Env, ceph

SECRET = "Abcdefgh12345678"


def spec(**kw: object) -> TargetSpec:
    base: dict = {"name": "4242img7", "iqn": "iqn.2017-10.org.moc.bmi:4242img7",
                  "backing": Backing("rbd", "rbd/4242img7"), "initiator_names": ["iqn.2017-10.x:node1"], "tid": 3}
    base.update(kw)
    return TargetSpec(**base)


def test_new_secret_is_random_and_valid() -> None:
    seen = {chap.new_secret() for _ in range(200)}
    assert len(seen) == 200
    for secret in seen:
        assert re.fullmatch(r"[A-Za-z0-9]{16}", secret)
        assert chap.check_chap(("u", secret)) == ("u", secret)
    assert chap.account("4242img7", None) is None and chap.account("4242img7", "") is None
    assert chap.account("4242img7", SECRET) == ("4242img7", SECRET)


@pytest.mark.parametrize("bad", [("u", "short1"), ("u", "x" * 65), ("u", "has space12345"), ("u", "new\nline12345678"),
                                 ("u", "dollar$12345678"), ("u", "pct%abcdefgh1234"), ("bad user", SECRET),
                                 ("u\nset x", SECRET), ("", SECRET), ("u",), "u:secret", ("u", None)])
def test_check_chap_refuses_what_could_inject_or_break_a_login(bad: object) -> None:
    with pytest.raises(InvalidInput) as exc:
        chap.check_chap(bad)
    if isinstance(bad, tuple) and len(bad) == 2 and isinstance(bad[1], str) and len(bad[1]) > 4:
        assert bad[1] not in exc.value.message   # never echo a secret


def test_conf_file_round_trip_with_incominguser() -> None:
    text = render_conf(spec(chap=("4242img7", SECRET)))
    assert f"    incominguser 4242img7 {SECRET}\n" in text
    assert text.index("incominguser") < text.index("</target>")
    back = parse_conf(text, "4242img7")
    assert back.chap == ("4242img7", SECRET) and back.tid == 3
    assert back.initiator_names == ["iqn.2017-10.x:node1"]
    # repr (logs, tracebacks) never shows the secret
    assert SECRET not in repr(back)
    plain = render_conf(spec())
    assert "incominguser" not in plain and parse_conf(plain, "4242img7").chap is None


def test_conf_file_with_bad_or_two_accounts_is_refused() -> None:
    text = render_conf(spec(chap=("4242img7", SECRET)))
    with pytest.raises(InvalidInput):
        parse_conf(text.replace("</target>", "    incominguser other Zyxwvuts12345678\n</target>"), "4242img7")
    with pytest.raises(InvalidInput):
        parse_conf(text.replace(SECRET, "bad$ecret1234567"), "4242img7")
    with pytest.raises(InvalidInput):
        render_conf(spec(chap=("4242img7", "a b")))


SHOW = """Target 3: iqn.2017-10.org.moc.bmi:4242img7
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
        LUN: 1
            Type: disk
            Backing store path: rbd/4242img7
    Account information:
        4242img7
        mutual (outgoing)
    ACL information:
        0.0.0.0/32
        iqn.2017-10.x:node1
Target 4: iqn.2017-10.org.moc.bmi:4242img8
    System information:
        Driver: iscsi
    LUN information:
    Account information:
    ACL information:
        ALL
"""


def test_parse_show_reads_bound_accounts() -> None:
    live = parse_show(SHOW)
    t7, t8 = live["iqn.2017-10.org.moc.bmi:4242img7"], live["iqn.2017-10.org.moc.bmi:4242img8"]
    assert t7.accounts == ["4242img7"]               # outgoing users are not incoming CHAP
    assert t7.acl == ["0.0.0.0/32", "iqn.2017-10.x:node1"] and t7.backing_stores == {1: "rbd/4242img7"}
    assert t8.accounts == [] and t8.acl == ["ALL"]


def test_ipxe_script_sets_username_and_password_before_sanboot(tmp_path) -> None:
    boot = BootFiles(str(tmp_path / "pxelinux.cfg"), str(tmp_path), "10.0.0.1")
    script = boot.render_ipxe("iqn.2017-10.org.moc.bmi:4242img7", "iqn.2017-10.x:node1", ("4242img7", SECRET))
    lines = [line.strip() for line in script.splitlines()]
    assert lines.index("set username 4242img7") < lines.index(f"set password {SECRET}") \
        < next(i for i, line in enumerate(lines) if line.startswith("sanboot"))
    assert lines.index("set initiator-iqn iqn.2017-10.x:node1") < lines.index("set username 4242img7")
    plain = boot.render_ipxe("iqn.2017-10.org.moc.bmi:4242img7", "iqn.2017-10.x:node1")
    assert "username" not in plain and "password" not in plain
    with pytest.raises(InvalidInput):
        boot.render_ipxe("iqn.2017-10.org.moc.bmi:4242img7", None, ("4242img7", "x\nchain http://evil/"))
    (tmp_path / "pxelinux.cfg").mkdir()
    paths = boot.write("node1", MAC, "img", "iqn.2017-10.org.moc.bmi:4242img7", None, ("4242img7", SECRET))
    for path in paths[:2]:   # the node's script and its per-MAC copy for UEFI
        assert f"set password {SECRET}\n" in open(path).read()
    assert SECRET not in open(paths[2]).read()   # PXELINUX's file only names the script


def test_provision_makes_a_secret_per_node_and_keeps_it_out_of_the_journal(tmp_path, caplog) -> None:
    env = Env(tmp_path)
    try:
        ops = env.ops
        assert env.cfg.iscsi.chap is True   # on by default
        ops.import_image(USER, "bmi_infra", "bmi-test-image")
        ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
        ops.provision(USER, "bmi_infra", "node2", "bmi-test-image", "bmi_network", "bmi_port")
        with ops.journal.session() as s:
            secrets = {r.name: r.chap_secret for r in s.scalars(select(Image)).all()}
            journal = json.dumps([[o.args, o.steps, o.error] for o in s.scalars(select(Operation)).all()])
        assert secrets["bmi-test-image"] is None              # golden images have no target of their own
        s1, s2 = secrets["bmi_node"], secrets["node2"]
        assert s1 and s2 and s1 != s2
        assert env.iscsi.targets[ceph(2)]["chap"] == (ceph(2), s1)
        assert env.iscsi.targets[ceph(3)]["chap"] == (ceph(3), s2)
        script = (env.tftp / "bmi_node.ipxe").read_text()
        assert f"set username {ceph(2)}\n" in script and f"set password {s1}\n" in script
        assert ops.boot_script(MAC) == script
        assert s1 not in journal and s2 not in journal and s1 not in caplog.text
        assert s1 not in json.dumps(ops.db_list(USER)) and s1 not in json.dumps(ops.list_provisioned(USER, "bmi_infra"))
        assert stat.S_IMODE(os.stat(env.tftp / "bmi_node.ipxe").st_mode) == 0o644   # the TFTP server reads it
        # reconcile sees nothing wrong; a script that lost its CHAP lines is stale and rewritten
        assert ops.reconcile(ADMIN)["stale_boot_files"] == []
        (env.tftp / "bmi_node.ipxe").write_text(script.replace(f"      set password {s1}\n", ""))
        report = ops.reconcile(ADMIN, repair=True)
        assert report["stale_boot_files"] == ["bmi_node"]
        assert (env.tftp / "bmi_node.ipxe").read_text() == script
        ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
        assert ceph(2) not in env.iscsi.targets and not (env.tftp / "bmi_node.ipxe").exists()
    finally:
        env.ops.close()


def test_chap_off_makes_no_secret(tmp_path) -> None:
    env = Env(tmp_path)
    try:
        env.cfg.section("iscsi").values["chap"] = False
        ops = env.ops
        ops.import_image(USER, "bmi_infra", "bmi-test-image")
        ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
        with ops.journal.session() as s:
            assert s.scalars(select(Image.chap_secret).where(Image.name == "bmi_node")).one() is None
        assert env.iscsi.targets[ceph(2)]["chap"] is None
        assert "password" not in (env.tftp / "bmi_node.ipxe").read_text()
    finally:
        env.ops.close()


def test_split_api_disk_and_http_boot_carry_the_disks_secret(tmp_path, caplog) -> None:
    from ims.picasso.boot import create_boot_app

    env = Env(tmp_path)
    try:
        env.cfg.tftp.values["boot_mode"] = "http"
        env.cfg.boot_http.values["ip"] = "10.77.0.1"
        ops = env.ops
        ops.import_image(USER, "bmi_infra", "bmi-test-image")
        ops.create_disk(USER, "bmi_infra", "disk1", "bmi-test-image")
        with ops.journal.session() as s:
            secret = s.scalars(select(Image.chap_secret).where(Image.name == "disk1")).one()
        assert secret and env.iscsi.targets[ceph(2)]["chap"] == (ceph(2), secret)
        ops.provision_disk(USER, "bmi_infra", "node2", "disk1", "bmi_port")
        client = create_boot_app(ops).test_client()
        r = client.get("/boot/52:54:00:aa:bb:02")
        assert r.status_code == 200 and f"set username {ceph(2)}\n" in r.text and f"set password {secret}\n" in r.text
        unknown = client.get("/boot/52:54:00:aa:bb:77")
        assert unknown.status_code == 404 and "password" not in unknown.text
        ops.deprovision_disk(USER, "bmi_infra", "node2", "bmi_port")
        assert client.get("/boot/52:54:00:aa:bb:02").status_code == 404
        ops.delete_disk(USER, "bmi_infra", "disk1")
        assert ceph(2) not in env.iscsi.targets
        assert secret not in caplog.text
    finally:
        env.ops.close()


def test_a_database_of_an_earlier_release_gets_the_column(tmp_path) -> None:
    import sqlite3

    env = Env(tmp_path)
    env.ops.close()
    with sqlite3.connect(tmp_path / "bmi.db") as db:
        db.execute("ALTER TABLE image DROP COLUMN chap_secret")
        assert "chap_secret" not in [r[1] for r in db.execute("PRAGMA table_info(image)")]
    again = Env(tmp_path / "again")   # drivers for a worker of this release opening that database
    try:
        from ims.einstein.operations import Operations

        ops = Operations(again.cfg, again.storage, again.iscsi, again.ops.boot, again.hil.client,
                         db_url=f"sqlite:///{tmp_path}/bmi.db")
        try:
            with sqlite3.connect(tmp_path / "bmi.db") as db:
                assert "chap_secret" in [r[1] for r in db.execute("PRAGMA table_info(image)")]
        finally:
            ops.close()
    finally:
        again.ops.close()

"""CHAP on real parts: tgtd's incominguser accounts checked by libiscsi logins.

Driver level (a private tgtd, file backing stores): the right secret logs in, a wrong, missing
or neighbour's one is refused; the accounts survive a Debian-style tgt.service restart (tgt-admin
loads ``incominguser`` from the conf files) and a crash + :meth:`TgtTarget.restore`; removing a
target deletes its account and only its account.

Operations level (throwaway Ceph, HIL simulator, a private tgtd, SQLite): provision gives each
node its own secret, in the row, the 0600 conf file and the node's iPXE script only; the clone
reads through libiscsi with it; after a Debian restart both nodes still log in; deprovision
removes the account; the secret is in no log record, journal row or API answer.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from ims.common.errors import InvalidInput
from ims.database.models import Image, Operation, Task
from ims.einstein.iscsi import chap
from ims.einstein.iscsi.tgt import TgtTarget
from ims.einstein.storage.base import Backing
from tests.integration.test_operations_real import ADMIN, GOLDEN, NET, NIC, NODE, USER, RealEnv
from tests.support import iscsi_rw
from tests.support.private_tgt import private_tgtd_env
from tests.support.tgt import TgtdInstance, debian_restart, start_tgtd, stop_tgtd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MiB = 1 << 20
PREFIX = "iqn.2026-01.org.bmi.chap:"
INITIATOR = "iqn.2026-01.org.bmi.chap.node:"
NODE_PREFIX = "iqn.2017-10.org.moc.bmi.node:"
CISCO, CISCO_NIC = "cisco-01", "enp130s0f0"


def accounts(instance: TgtdInstance) -> list[str]:
    """tgtd's account list (``--op show --mode account``), as the daemon reports it."""
    out = subprocess.run(["tgtadm", "-C", str(instance.control_port), "--op", "show", "--mode", "account"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(line.strip() for line in out.splitlines()[1:] if line.strip())


def refused(portal: str, iqn: str, initiator: str, account: tuple[str, str] | None) -> str:
    with pytest.raises(iscsi_rw.IscsiIOError) as exc:
        iscsi_rw.read_lun(portal, iqn, 1, 0, 1, initiator=initiator, chap=account)
    return str(exc.value)


def test_driver_chap_login_restart_restore_and_removal(tmp_path: Path) -> None:
    run_dir = tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path)
    conf_dir = str(tmp_path / "conf.d")
    instance = start_tgtd(run_dir)
    try:
        drv = TgtTarget(conf_dir, control_port=instance.control_port, iqn_prefix=PREFIX)
        secrets = {n: chap.new_secret() for n in ("a-node", "b-node")}
        data = {}
        for name in secrets:
            path = tmp_path / f"{name}.img"
            data[name] = os.urandom(MiB)
            path.write_bytes(data[name])
            drv.add_target(name, Backing("rdwr", str(path)), None, [INITIATOR + name], chap=(name, secrets[name]))
        # the conf file carries the secret: readable by its owner only
        for name, secret in secrets.items():
            conf = Path(drv.conf_path(name))
            assert stat.S_IMODE(conf.stat().st_mode) == 0o600
            assert iscsi_rw.conf_chap(conf) == (name, secret)
            assert drv.chap_user(name) == name
        assert accounts(instance) == ["a-node", "b-node"]
        assert drv.live_target("a-node").accounts == ["a-node"]   # type: ignore[union-attr]

        def check_logins() -> None:
            for name, secret in secrets.items():
                iqn, who = drv.iqn(name), INITIATOR + name
                assert iscsi_rw.read_lun(instance.portal, iqn, 1, 0, 8, initiator=who, chap=(name, secret)) \
                    == data[name][:4096]
                assert "Authentication failure" in refused(instance.portal, iqn, who, None)
                assert "Authentication failure" in refused(instance.portal, iqn, who, (name, "x" * 16))
            # the neighbour's own account does not open a's target
            assert "Authentication failure" in refused(instance.portal, drv.iqn("a-node"), INITIATOR + "a-node",
                                                       ("b-node", secrets["b-node"]))

        check_logins()

        # Debian's tgt.service restart: tgt-admin re-creates the accounts from `incominguser`
        debian_restart(instance, conf_dir)
        assert accounts(instance) == ["a-node", "b-node"]
        assert drv.restore() == 0
        check_logins()

        # a crash: tgtd comes back empty (no tgt-admin); restore re-creates targets and accounts
        os.kill(instance.pid, signal.SIGKILL)
        for _ in range(100):
            if not instance.alive():
                break
            time.sleep(0.05)
        stop_tgtd(instance)  # the daemon is gone; this cleans its socket and pid files
        instance = start_tgtd(run_dir)
        drv = TgtTarget(conf_dir, control_port=instance.control_port, iqn_prefix=PREFIX)
        assert accounts(instance) == []
        assert drv.restore() == 2
        assert accounts(instance) == ["a-node", "b-node"]
        check_logins()

        # an account someone left behind under a's name is replaced (its secret is unknown)
        drv.remove_target("a-node")
        assert accounts(instance) == ["b-node"]              # a's account went with its target, b's stayed
        subprocess.run(["tgtadm", "-C", str(instance.control_port), "--op", "new", "--mode", "account",
                        "--user", "a-node", "--password", "StaleStaleStale1"], check=True, capture_output=True)
        drv.add_target("a-node", Backing("rdwr", str(tmp_path / "a-node.img")), None, [INITIATOR + "a-node"],
                       chap=("a-node", secrets["a-node"]))
        check_logins()

        # drift seen by reconcile: a conf file with another secret, an account unbound; repair fixes both
        assert drv.chap_drift("a-node", ("a-node", secrets["a-node"])) is None
        conf_a = Path(drv.conf_path("a-node"))
        conf_a.write_text(conf_a.read_text().replace(secrets["a-node"], "OtherOtherOther1"))
        assert "another CHAP account or secret" in (drv.chap_drift("a-node", ("a-node", secrets["a-node"])) or "")
        subprocess.run(["tgtadm", "-C", str(instance.control_port), "--op", "unbind", "--mode", "account",
                        "--tid", str(drv.live_target("a-node").tid), "--user", "a-node"],  # type: ignore[union-attr]
                       check=True, capture_output=True)
        drv.repair_chap("a-node", ("a-node", secrets["a-node"]))
        assert drv.chap_drift("a-node", ("a-node", secrets["a-node"])) is None
        assert iscsi_rw.conf_chap(conf_a) == ("a-node", secrets["a-node"])
        assert stat.S_IMODE(conf_a.stat().st_mode) == 0o600
        check_logins()

        # bad accounts are refused before anything is made
        with pytest.raises(InvalidInput):
            drv.add_target("c-node", Backing("rdwr", str(tmp_path / "a-node.img")), ["ALL"], chap=("b-node", "A" * 16))
        with pytest.raises(InvalidInput) as bad:
            drv.add_target("c-node", Backing("rdwr", str(tmp_path / "a-node.img")), ["ALL"],
                           chap=("c-node", "bad secret\nset x"))
        assert "bad secret" not in str(bad.value)
        assert not os.path.exists(drv.conf_path("c-node")) and accounts(instance) == ["a-node", "b-node"]

        for name in secrets:
            drv.remove_target(name)
        assert accounts(instance) == [] and drv.list_targets() == []
    finally:
        stop_tgtd(instance)


@pytest.fixture()
def env(tmp_path, ceph_cluster, hil_sim):
    with private_tgtd_env(tmp_path, ceph_cluster, hil_sim) as e:
        yield e


def row_of(env: RealEnv, node: str) -> tuple[str, str | None]:
    with env.ops.journal.session() as s:
        row = s.scalars(select(Image).where(Image.name == node)).one()
        return env.ceph(row.id), row.chap_secret


def test_provision_chap_end_to_end(env: RealEnv, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ops, drv = env.ops, env.ops.iscsi
    assert isinstance(drv, TgtTarget) and env.cfg.iscsi.chap is True   # on by default
    portal = env.tgtd.portal
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    ops.provision(USER, "bmi_infra", CISCO, "bmi-test-image", NET, CISCO_NIC)
    (c1, s1), (c2, s2) = row_of(env, NODE), row_of(env, CISCO)
    assert s1 and s2 and s1 != s2 and re.fullmatch(r"[A-Za-z0-9]{16}", s1)

    # the secret is in the row, the 0600 conf file and the node's boot script
    assert iscsi_rw.conf_chap(drv.conf_path(c1)) == (c1, s1)
    assert stat.S_IMODE(os.stat(drv.conf_path(c1)).st_mode) == 0o600
    script = ops.boot.read_ipxe(NODE)
    assert f"set username {c1}\n" in script and f"set password {s1}\n" in script
    assert script.index("set password") < script.index("sanboot")
    mac = next(n["macaddr"] for n in env.hil.show_node(NODE)["nics"] if n["label"] == NIC)
    assert Path(ops.boot.mac_ipxe_file(mac)).read_text() == script      # the UEFI nodes' per-MAC copy
    assert ops.boot_script(mac) == script                                # what GET /boot/<mac> answers

    # libiscsi: the node's secret reads its clone; none, a wrong one or the neighbour's is refused
    who1, who2 = NODE_PREFIX + NODE, NODE_PREFIX + CISCO
    assert iscsi_rw.read_lun(portal, drv.iqn(c1), 1, 0, 2048, initiator=who1, chap=(c1, s1)) == GOLDEN
    assert "Authentication failure" in refused(portal, drv.iqn(c1), who1, None)
    assert "Authentication failure" in refused(portal, drv.iqn(c1), who1, (c1, s2))
    assert "Authentication failure" in refused(portal, drv.iqn(c1), who1, (c2, s2))
    assert env.tgtd and accounts(env.tgtd) == sorted([c1, c2])

    # Debian-style tgt restart, then Einstein's start-up restore: both secrets still work
    debian_restart(env.tgtd, drv.conf_dir)
    ops.iscsi.restore()
    assert accounts(env.tgtd) == sorted([c1, c2])
    assert iscsi_rw.read_lun(portal, drv.iqn(c1), 1, 0, 8, initiator=who1, chap=(c1, s1)) == GOLDEN[:4096]
    assert iscsi_rw.read_lun(portal, drv.iqn(c2), 1, 0, 8, initiator=who2, chap=(c2, s2)) == GOLDEN[:4096]
    assert "Authentication failure" in refused(portal, drv.iqn(c2), who2, None)

    report = ops.reconcile(ADMIN)
    assert report["targets_without_chap"] == [] and report["stale_boot_files"] == []

    # drift: the node's account deleted behind BMI's back is reported, and --repair re-binds it
    subprocess.run(["tgtadm", "-C", str(env.tgtd.control_port), "--op", "delete", "--mode", "account",
                    "--user", c1], check=True, capture_output=True)
    # tgtd then lets ANY login in without CHAP: the drift that matters
    assert iscsi_rw.read_lun(portal, drv.iqn(c1), 1, 0, 8, initiator=who1, chap=None) == GOLDEN[:4096]
    report = ops.reconcile(ADMIN)
    assert report["targets_without_chap"] == [c1] and any(c1 in n for n in report["notes"])
    report = ops.reconcile(ADMIN, repair=True)
    assert f"re-bind the CHAP account of target {c1}" in report["actions"]
    assert ops.reconcile(ADMIN)["targets_without_chap"] == []
    assert iscsi_rw.read_lun(portal, drv.iqn(c1), 1, 0, 8, initiator=who1, chap=(c1, s1)) == GOLDEN[:4096]
    assert "Authentication failure" in refused(portal, drv.iqn(c1), who1, None)

    # deprovision removes the node's account, never the neighbour's
    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    assert accounts(env.tgtd) == [c2]
    assert iscsi_rw.read_lun(portal, drv.iqn(c2), 1, 0, 8, initiator=who2, chap=(c2, s2)) == GOLDEN[:4096]

    # the secrets are in no log record, journal row, task row or listing
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "HIL GET" in logged  # the DEBUG capture saw the operations' calls: the checks below mean something
    # tgtadm's requests went to tgtd's control socket ([iscsi] control = socket): no command line carried a secret
    assert ops.iscsi._ipc is not None
    with ops.journal.session() as s:
        journal = json.dumps([[o.args, o.steps, o.error] for o in s.scalars(select(Operation)).all()])
        tasks = json.dumps([[t.args, t.result, t.error] for t in s.scalars(select(Task)).all()])
    listing = json.dumps(ops.db_list(USER, name=CISCO)) + json.dumps(ops.list_images(USER, "bmi_infra"))
    log_files = "".join(p.read_text(errors="replace") for p in Path(env.tmp).rglob("*.log") if p.is_file())
    for secret in (s1, s2):
        assert secret not in logged and secret not in journal and secret not in tasks
        assert secret not in listing and secret not in log_files
        assert secret not in caplog.text


class Boom(Exception):
    pass


def test_a_failed_provision_leaves_no_account_and_a_failed_dpro_keeps_it(env: RealEnv) -> None:
    """Fault injection at every step of pro after the target exists: the roll-back removes the
    target's account with it; a dpro rolled back before its commit point re-adds the target with
    the SAME secret (the node's boot script still works)."""
    ops, drv = env.ops, env.ops.iscsi
    assert isinstance(drv, TgtTarget)
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    steps: list[tuple[str, str]] = []
    ops.journal.fault_hook = lambda name, phase: steps.append((name, phase))
    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    ops.journal.fault_hook = None
    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    assert accounts(env.tgtd) == []
    after_target = steps[steps.index(("iscsi.add_target", "after")):]
    for name, phase in [s for s in after_target if s[0] != "commit"][:3]:
        def hook(n: str, p: str, at: tuple[str, str] = (name, phase)) -> None:
            if (n, p) == at:
                raise Boom(f"injected at {n}/{p}")

        ops.journal.fault_hook = hook
        with pytest.raises(Boom):
            ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
        ops.journal.fault_hook = None
        assert accounts(env.tgtd) == [] and env.tgt_targets() == [], f"fault at {name}/{phase}"

    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    clone, secret = row_of(env, NODE)
    assert secret is not None

    def fail_dpro(n: str, p: str) -> None:
        if (n, p) == ("iscsi.remove_target", "after"):
            raise Boom("injected")

    ops.journal.fault_hook = fail_dpro
    with pytest.raises(Boom):
        ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    ops.journal.fault_hook = None
    assert accounts(env.tgtd) == [clone] and row_of(env, NODE) == (clone, secret)
    assert iscsi_rw.conf_chap(drv.conf_path(clone)) == (clone, secret)
    assert iscsi_rw.read_lun(env.tgtd.portal, drv.iqn(clone), 1, 0, 8, initiator=NODE_PREFIX + NODE,
                             chap=(clone, secret)) == GOLDEN[:4096]
    assert "Authentication failure" in refused(env.tgtd.portal, drv.iqn(clone), NODE_PREFIX + NODE, None)
    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    assert accounts(env.tgtd) == []

"""The host registry and the hash ring (ims/einstein/hosts.py) on a real SQLite file."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from ims.common import config
from ims.common.errors import ConfigError
from ims.database import make_engine, make_session_factory
from ims.database.models import Host
from ims.einstein import journal
from ims.einstein.hosts import HashRing, Hosts


def cfg_for(tmp: Path, name: str, dead_after: float = 10.0, extra: str = "") -> config.BMIConfig:
    return config.parse("test.cfg", f"[bmi]\nuid = t\n[db]\npath = {tmp}/bmi.db\n[net_isolator]\nurl = http://x\n"
                                    f"[iscsi]\nip = 127.0.0.9\n[host]\nname = {name}\n"
                                    f"dead_after_seconds = {dead_after}\n{extra}")


def hosts_for(tmp: Path, name: str) -> Hosts:
    cfg = cfg_for(tmp, name)
    engine = make_engine(cfg.db_url)
    return Hosts(cfg, make_session_factory(engine), engine)


def test_ring_is_deterministic_spreads_and_moves_few_keys_when_a_host_leaves() -> None:
    keys = [f"node{i}" for i in range(600)]
    three = HashRing(["a", "b", "c"])
    assert [three.get(k) for k in keys] == [HashRing(["c", "a", "b"]).get(k) for k in keys]
    counts = {h: sum(three.get(k) == h for k in keys) for h in "abc"}
    assert min(counts.values()) > 100, counts  # each host gets a fair share
    two = HashRing(["a", "b"])
    moved = [k for k in keys if three.get(k) != "c" and two.get(k) != three.get(k)]
    assert moved == []  # only the lost host's keys move
    assert HashRing([]).get("x") is None


def test_register_heartbeat_liveness_and_fencing(tmp_path: Path) -> None:
    one, two = hosts_for(tmp_path, "h1"), hosts_for(tmp_path, "h2")
    assert one.register() == 1 and two.register() == 1
    assert one.live(fresh=True) == ["h1", "h2"] and one.heartbeat()
    assert one.alive("h2") and one.alive("never-registered")  # not ours to judge
    with one.session() as s:  # h2 stops heart-beating
        s.execute(update(Host).where(Host.name == "h2")
                  .values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=60)))
    assert one.live(fresh=True) == ["h1"] and not one.alive("h2")
    assert one.ring().get("anything") == "h1"
    with one.session() as s:  # taken over: epoch bumped
        s.execute(update(Host).where(Host.name == "h2").values(state="dead", epoch=Host.epoch + 1))
    assert not two.heartbeat()  # fenced
    assert two.register() == 3 and two.heartbeat() and "h2" in one.live(fresh=True)


def test_remote_owner_liveness_follows_the_heartbeat(tmp_path: Path) -> None:
    from ims.einstein import hosts as hosts_module

    cfg = cfg_for(tmp_path, "h1")
    engine = make_engine(cfg.db_url)
    saved = dict(journal.HOST)
    try:
        me = hosts_module.install(cfg, make_session_factory(engine), engine)
        me.register()
        other = hosts_for(tmp_path, "h2")
        other.register()
        assert journal.current_owner().startswith("h1:")
        assert journal.owner_alive("h2:1:1")
        with me.session() as s:
            s.execute(update(Host).where(Host.name == "h2")
                      .values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=60)))
        me._cache = (0.0, {})
        assert not journal.owner_alive("h2:1:1")
    finally:
        journal.HOST.update(saved)


def test_bad_host_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        hosts_for(tmp_path, "a:b")
    cfg = cfg_for(tmp_path, "h1", dead_after=1.0, extra="heartbeat_seconds = 2\n")
    engine = make_engine(cfg.db_url)
    with pytest.raises(ConfigError):
        Hosts(cfg, make_session_factory(engine), engine)

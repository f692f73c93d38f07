from __future__ import annotations

import pytest

from ims.common import config, names
from ims.common.errors import ConfigError, InvalidInput, InvalidName

MINIMAL = """
[bmi]
uid = 5
[iscsi]
ip = 10.0.0.1
[net_isolator]
url = http://127.0.0.1:7000
"""


def test_defaults_fill_everything_but_site_values():
    cfg = config.parse("x.cfg", MINIMAL)
    assert cfg.bmi.uid == "5"
    assert cfg.bmi.snapshot == "snapshot"
    assert cfg.iscsi.port == 3260 and cfg.iscsi.lun == 1
    assert cfg.tftp.boot_interface == "net0"
    assert cfg.rpc.workers == 2
    assert cfg.db_url == "sqlite:////var/lib/bmi/bmi.db"


@pytest.mark.parametrize("section,key", [("bmi", "uid"), ("iscsi", "ip"), ("net_isolator", "url")])
def test_missing_required_key_names_file_section_and_key(section, key):
    text = "\n".join(line for line in MINIMAL.splitlines() if not line.startswith(key + " ="))
    with pytest.raises(ConfigError) as err:
        config.parse("/etc/bmi/site.cfg", text)
    msg = str(err.value)
    assert "/etc/bmi/site.cfg" in msg and f"[{section}]" in msg and f"'{key}'" in msg


def test_invalid_values_are_reported():
    with pytest.raises(ConfigError, match=r"\[logs\] debug"):
        config.parse("c", MINIMAL + "[logs]\ndebug = maybe\n")
    with pytest.raises(ConfigError, match=r"\[iscsi\] port"):
        config.parse("c", MINIMAL.replace("ip = 10.0.0.1", "ip = 10.0.0.1\nport = many"))
    with pytest.raises(ConfigError, match="lun"):
        config.parse("c", MINIMAL.replace("ip = 10.0.0.1", "ip = 10.0.0.1\nlun = 0"))
    with pytest.raises(ConfigError, match="driver"):
        config.parse("c", MINIMAL + "[fs]\ndriver = nfs\n")
    with pytest.raises(ConfigError, match=r"\[iscsi\] control"):
        config.parse("c", MINIMAL.replace("ip = 10.0.0.1", "ip = 10.0.0.1\ncontrol = fork"))
    with pytest.raises(ConfigError, match="uid"):
        config.parse("c", MINIMAL.replace("uid = 5", "uid = ../x"))


def test_paths_do_not_need_trailing_slash_and_missing_file_is_clear(tmp_path):
    cfg = config.parse("c", MINIMAL + "[tftp]\nipxe_path = /srv/tftp/\npxelinux_path = /srv/tftp/pxelinux.cfg\n")
    assert cfg.tftp.ipxe_path == "/srv/tftp"
    with pytest.raises(ConfigError, match="not found"):
        config.parse(str(tmp_path / "nope.cfg"))


def test_load_uses_env(tmp_path, monkeypatch):
    path = tmp_path / "bmi.cfg"
    path.write_text(MINIMAL)
    monkeypatch.setenv("BMI_CONFIG", str(path))
    assert config.load(force=True).path == str(path)


@pytest.mark.parametrize("good", ["bmi_infra", "cirros-0.3.0-x86_64-disk.img", "a", "A9._-", "x" * 64])
def test_good_names(good):
    assert names.validate_name(good, "image") == good


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a b", "a\nb", ".hidden", "-x", "x" * 65, "a;b", "a$b",
                                 "`x`", "ü", "trailing\n", None, 5])
def test_bad_names_are_refused(bad):
    with pytest.raises(InvalidName) as err:
        names.validate_name(bad, "node")
    assert err.value.status == 400 and "invalid node name" in str(err.value)


def test_mac_normalization():
    assert names.normalize_mac("52:54:00:AA:bb:01") == "52:54:00:aa:bb:01"
    assert names.normalize_mac("52-54-00-AA-BB-01") == "52:54:00:aa:bb:01"
    assert names.pxe_mac_filename("52:54:00:AA:BB:01") == "01-52-54-00-aa-bb-01"
    for bad in ("52:54:00:aa:bb", "52:54:00:aa:bb:zz", "52:54-00:aa:bb:01", "x"):
        with pytest.raises(InvalidInput):
            names.normalize_mac(bad)


def test_ids_are_bounded_below_sqlites_counter():
    assert names.validate_id(1) == 1 and names.validate_id(names.MAX_ID) == names.MAX_ID
    for bad in (0, -1, names.MAX_ID + 1, 2 ** 63 - 1, 2 ** 63, True, "3", 1.0, None):
        with pytest.raises(InvalidInput):
            names.validate_id(bad)


def test_bmis_storage_namespace_is_reserved():
    assert names.is_internal("5img7", "5") and names.is_internal("5img", "5") and names.is_internal("5IMGx", "5")
    assert not names.is_internal("img5", "5") and not names.is_internal("55img1", "5")
    assert names.validate_user_name("cirros", "image", "5") == "cirros"
    for bad in ("5img12", "5img", "5imgfoo", "5Img3"):
        with pytest.raises(InvalidName, match="reserved"):
            names.validate_user_name(bad, "image", "5")
    with pytest.raises(InvalidName):
        names.validate_user_name("../x", "image", "5")


def test_safety_keys():
    cfg = config.parse("x.cfg", MINIMAL)
    assert cfg.bmi.import_pattern == "" and cfg.net_isolator.service_username == ""
    cfg = config.parse("x.cfg", MINIMAL.replace("[iscsi]", "import_pattern = ^golden-.*$\n[iscsi]")
                       + "service_username = bmi\nservice_password = pw\n")
    assert cfg.bmi.import_pattern == "^golden-.*$" and cfg.net_isolator.service_password == "pw"
    with pytest.raises(ConfigError, match="import_pattern"):
        config.parse("x.cfg", MINIMAL.replace("[iscsi]", "import_pattern = ([\n[iscsi]"))
    with pytest.raises(ConfigError, match="service_username"):
        config.parse("x.cfg", MINIMAL + "service_username = bmi\n")

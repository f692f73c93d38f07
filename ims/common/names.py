"""Allow-list validation of every name before it reaches a path, a file, a command or Ceph."""
from __future__ import annotations

import re

from ims.common.errors import InvalidInput, InvalidName

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
# iSCSI qualified names: iqn.yyyy-mm.reverse.domain[:anything-safe]
IQN_PREFIX_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+[:.]?)?$")

KINDS = ("project", "node", "image", "snapshot", "network", "nic", "disk", "user")


def validate_name(value: object, kind: str = "name") -> str:
    """Return ``value`` if it is an acceptable BMI name, else raise InvalidName (400).

    Allowed: 1-64 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit.
    That rules out path separators, ``..`` as a whole name, whitespace, newlines and
    every shell or PXE-file metacharacter.
    """
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        shown = repr(value) if isinstance(value, str) and len(value) <= 80 else f"<{type(value).__name__}>"
        raise InvalidName(
            f"invalid {kind} name {shown}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return value


def validate_names(**kwargs: object) -> None:
    """validate_names(project=p, node=n) validates each value as that kind."""
    for kind, value in kwargs.items():
        validate_name(value, kind)


def normalize_mac(value: object) -> str:
    """Lower-case, colon-separated MAC address, or InvalidInput (400)."""
    if not isinstance(value, str):
        raise InvalidInput("invalid MAC address")
    mac = value.strip().lower()
    if not MAC_RE.fullmatch(mac):
        raise InvalidInput(f"invalid MAC address {value!r}")
    return mac.replace("-", ":")


def pxe_mac_filename(mac: str) -> str:
    """PXELINUX per-MAC file name: ``01-aa-bb-cc-dd-ee-ff`` (ARP type 1, lower case)."""
    return "01-" + normalize_mac(mac).replace(":", "-")


# Ids of rows a user may choose (project create / db create).  SQLite's INTEGER PRIMARY KEY
# tops out at 2**63-1 and AUTOINCREMENT refuses to go past its largest id, so an id near the
# top would make every later insert fail: keep a reserve above MAX_ID for BMI's own rows.
MAX_ID = 2 ** 62


def validate_id(value: object, kind: str = "id") -> int:
    """Return ``value`` if it is an int in 1..MAX_ID, else raise InvalidInput (400)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise InvalidInput(f"{kind} must be an integer between 1 and {MAX_ID}")
    return value


def internal_prefix(uid: str) -> str:
    """The prefix of BMI's own storage names (``<uid>img<id>``)."""
    return f"{uid}img"


def is_internal(name: str, uid: str) -> bool:
    """True for any name in BMI's storage namespace (``<uid>img...``), not only ``<uid>img<digits>``.

    Compared case-insensitively: a pool on a case-insensitive file system, or a tenant
    hoping ``<UID>IMG7`` slips past, gets the same answer.
    """
    return name.lower().startswith(internal_prefix(uid).lower())


def validate_user_name(value: object, kind: str, uid: str) -> str:
    """A name a tenant chooses for something BMI will create or read in storage: a valid name
    outside BMI's internal namespace, else InvalidName (400)."""
    name = validate_name(value, kind)
    if is_internal(name, uid):
        raise InvalidName(f"invalid {kind} name {name!r}: names starting with {internal_prefix(uid)!r} are "
                          "reserved for BMI's own storage")
    return name

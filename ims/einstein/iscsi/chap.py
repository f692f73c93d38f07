"""CHAP for node targets: one random secret per provisioned clone, one tgt account per target.

The secret is made when the clone's row is inserted (``image.chap_secret``, see
ims/einstein/ops/steps.py), lives in that row and in the target's 0600 conf file
(``incominguser``), and reaches the node only through its iPXE script (``set username`` /
``set password``).  It is never a journal parameter, never logged and never returned by the
tenant API.  The account is named after the target (the clone's internal name, unique per
BMI instance and per IQN), so creating or deleting it never touches a neighbour's account.

Letters and digits only: the secret goes on tgtadm's argv, into a tgt-admin conf file, an iPXE
``set`` line and libiscsi URLs, none of which then needs quoting.  16 characters are 16 bytes
(RFC 3720 asks for at least 12) and ~95 bits of entropy, within the 12-16 characters some
initiators (Windows) accept.
"""
from __future__ import annotations

import re
import secrets
import string

from ims.common.errors import InvalidInput

# An account name per target and a secret BMI generates.  Both go
# on tgtadm's argv, into a conf file (space-separated) and into an iPXE script (``set password``), so
# the allow-lists admit no blank, quote, ``$``, ``#``, ``%``, ``@`` or ``:`` (libiscsi URLs).
CHAP_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CHAP_SECRET_RE = re.compile(r"^[A-Za-z0-9]{12,64}$")

SECRET_LENGTH = 16
_ALPHABET = string.ascii_letters + string.digits


def check_chap(chap: object) -> tuple[str, str] | None:
    """Allow-list a CHAP ``(user, secret)`` pair (None: no CHAP).  The error never shows the secret."""
    if chap is None:
        return None
    if not isinstance(chap, tuple | list) or len(chap) != 2:
        raise InvalidInput("a CHAP account is a (user, secret) pair")
    user, secret = chap
    if not isinstance(user, str) or not CHAP_USER_RE.fullmatch(user):
        raise InvalidInput(f"invalid CHAP user name {user!r}")
    if not isinstance(secret, str) or not CHAP_SECRET_RE.fullmatch(secret):
        raise InvalidInput(f"invalid CHAP secret for user {user}: 12-64 letters and digits")
    return user, secret


def new_secret() -> str:
    """A fresh random CHAP secret (``secrets``, the OS CSPRNG)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LENGTH))


def account(target: str, secret: str | None) -> tuple[str, str] | None:
    """The CHAP ``(user, secret)`` of ``target``, or None when it has no secret (CHAP off)."""
    if not secret:
        return None
    checked = check_chap((target, secret))
    assert checked is not None
    return checked

"""e2e fixtures: the network-boot test bed (tests/support/bootnet.py)."""
from __future__ import annotations

from tests.support.bootnet import boot_tgtd, bootnet, test_image  # noqa: F401

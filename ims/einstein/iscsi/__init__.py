"""iSCSI target drivers: ``tgt``, behind :class:`IscsiTarget`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ims.common.errors import ConfigError
from ims.einstein.iscsi.base import IscsiTarget

if TYPE_CHECKING:
    from ims.common.config import BMIConfig

__all__ = ["IscsiTarget", "from_config"]


def from_config(cfg: BMIConfig) -> IscsiTarget:
    if cfg.iscsi.driver == "tgt":
        from ims.einstein.iscsi.tgt import TgtTarget

        return TgtTarget(conf_dir=cfg.iscsi.conf_dir, control_port=cfg.iscsi.control_port,
                         iqn_prefix=cfg.iscsi.iqn_prefix, lun=cfg.iscsi.lun,
                         tgtadm=cfg.iscsi.tgtadm, timeout=cfg.iscsi.timeout, direct=cfg.iscsi.control == "socket")
    raise ConfigError(f"unknown [iscsi] driver {cfg.iscsi.driver!r}; valid: tgt")

"""Storage drivers: ``ceph`` (librbd) and ``file`` (raw sparse files), behind :class:`Storage`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ims.common.errors import ConfigError
from ims.einstein.storage.base import Backing, Storage

if TYPE_CHECKING:
    from ims.common.config import BMIConfig

__all__ = ["Backing", "Storage", "from_config"]


def from_config(cfg: BMIConfig) -> Storage:
    """Build the storage driver named by ``[fs] driver``."""
    if cfg.fs.driver == "ceph":
        from ims.einstein.storage.ceph import CephStorage

        return CephStorage(pool=cfg.fs.pool, conf_file=cfg.fs.conf_file, client_id=cfg.fs.id,
                           keyring=cfg.fs.keyring or None)
    if cfg.fs.driver == "file":
        from ims.einstein.storage.file import FileStorage

        return FileStorage(cfg.fs.path)
    raise ConfigError(f"unknown [fs] driver {cfg.fs.driver!r}; valid: ceph, file")

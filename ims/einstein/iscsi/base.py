"""The iSCSI target driver interface: one target per exported image, LUN ``lun``.

Error contract: TargetExists (409), TargetNotFound (404), IscsiError (503) when the
target daemon fails or cannot be reached.
"""
from __future__ import annotations

import abc

from ims.einstein.storage.base import Backing


class IscsiTarget(abc.ABC):
    name: str = "base"

    @abc.abstractmethod
    def iqn(self, target: str) -> str:
        """Full target IQN for a target name (configured prefix + name)."""

    @abc.abstractmethod
    def add_target(self, target: str, backing: Backing, initiators: list[str] | None = None,
                   initiator_names: list[str] | None = None) -> None:
        """Export ``backing`` as ``iqn(target)``, LUN ``lun``, touching only that target.

        ``initiators`` are addresses/CIDRs or ``["ALL"]``; ``initiator_names`` are
        initiator IQNs allowed to log in.  At least one of the two must be given.
        A conf file is kept so the target comes back after a daemon restart.
        :raises TargetExists: :raises IscsiError:
        """

    @abc.abstractmethod
    def remove_target(self, target: str) -> None:
        """Remove the target and its conf file. :raises TargetNotFound: :raises IscsiError:"""

    @abc.abstractmethod
    def target_exists(self, target: str) -> bool: ...

    @abc.abstractmethod
    def list_targets(self) -> list[str]:
        """Names (without prefix) of the targets this driver manages."""

    def restore(self) -> int:
        """Re-create every target from its conf file (after a daemon restart); returns the count."""
        return 0

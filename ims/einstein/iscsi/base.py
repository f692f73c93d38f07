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
                   initiator_names: list[str] | None = None, chap: tuple[str, str] | None = None) -> None:
        """Export ``backing`` as ``iqn(target)``, LUN ``lun``, touching only that target.

        ``initiators`` are addresses/CIDRs or ``["ALL"]``; ``initiator_names`` are
        initiator IQNs allowed to log in.  At least one of the two must be given.
        ``chap`` is ``(user, secret)`` with ``user == target``: an incoming CHAP account only
        this target uses (removed with it); None = no CHAP.
        A conf file is kept so the target comes back after a daemon restart.
        :raises TargetExists: :raises IscsiError:
        """

    def chap_user(self, target: str) -> str | None:
        """The incoming CHAP user the target was made with (None: none, or not known)."""
        return None

    def chap_drift(self, target: str, chap: tuple[str, str] | None) -> str | None:
        """Why the live target's CHAP account differs from ``chap`` (None: as expected, or not known)."""
        return None

    def repair_chap(self, target: str, chap: tuple[str, str]) -> None:
        """Re-create and bind ``target``'s CHAP account (and record it) without touching its sessions."""
        raise NotImplementedError

    @abc.abstractmethod
    def remove_target(self, target: str) -> None:
        """Remove the target carrying ``iqn(target)``, its CHAP account and conf file; never another target.

        :raises TargetNotFound: :raises IscsiError:"""

    @abc.abstractmethod
    def target_exists(self, target: str) -> bool:
        """Recorded by this driver AND live in the daemon under ``iqn(target)`` (never by a
        remembered number alone)."""

    @abc.abstractmethod
    def list_targets(self) -> list[str]:
        """Names (without prefix) of the targets this driver manages."""

    def live_targets(self) -> list[str]:
        """The names of :meth:`list_targets` that :meth:`target_exists` (drivers may do it in one call)."""
        return [t for t in self.list_targets() if self.target_exists(t)]

    def restore(self) -> int:
        """Start-up sync, called by Einstein before it serves: re-read where the daemon has
        each target now (tgt renumbers tids on restart), then re-create every target the
        daemon lost from its conf file; returns how many were re-created.  Idempotent."""
        return 0

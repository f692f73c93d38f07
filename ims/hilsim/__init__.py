"""A HIL (Hardware Isolation Layer) simulator speaking HIL's v0 REST API.

``create_app(inventory)`` builds the Flask app; ``python -m ims.hilsim`` or
``scripts/hil-simulator`` serves it. See reference/hil-api.md for the contract.
"""
from __future__ import annotations

from typing import Any


def create_app(inventory: dict[str, Any], action_delay: float = 0.2) -> Any:
    """Lazy re-export of :func:`ims.hilsim.app.create_app` (keeps ``import ims.hilsim.vm`` light)."""
    from ims.hilsim.app import create_app as _create_app

    return _create_app(inventory, action_delay=action_delay)

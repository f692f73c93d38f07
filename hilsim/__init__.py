"""A HIL (Hardware Isolation Layer) simulator speaking HIL's v0 REST API.

``create_app(inventory)`` builds the Flask app; ``python -m hilsim`` or
``scripts/hil-simulator`` serves it. See reference/hil-api.md for the contract.
"""
from __future__ import annotations

from typing import Any


def create_app(inventory: dict[str, Any], action_delay: float = 0.2) -> Any:
    """Lazy re-export of :func:`hilsim.app.create_app` (keeps ``import hilsim.vm`` light)."""
    from hilsim.app import create_app as _create_app

    return _create_app(inventory, action_delay=action_delay)

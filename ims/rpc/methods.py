"""The explicit allow-list of operations Einstein serves over RPC.

Only these names can be called through Pyro4; anything else is refused before any
attribute lookup happens, so private helpers of the operations class are unreachable.
"""
from __future__ import annotations

from ims.einstein.operations import Operations
from ims.einstein.ops.expose import exposed

# Generated from the facade's @rpc marks: a verb is served exactly when Operations says so.
ALLOWED_METHODS: frozenset[str] = exposed(Operations)

# Operations that only an administrator may run (Picasso enforces this; listed here
# so every layer shares one definition): the verbs marked @rpc(admin=True).
ADMIN_METHODS: frozenset[str] = exposed(Operations, admin=True)

NAME_PREFIX = "bmi.einstein."
DEFAULT_OPS_FACTORY = "ims.einstein.operations:Operations.from_config"

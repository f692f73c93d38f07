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

# Operations that change nothing: the RPC client may re-send one of these to another worker
# when the connection broke after the request may have been sent.  A mutation is never
# re-sent (the worker may have run it); the caller is told so instead.
READ_ONLY_METHODS: frozenset[str] = exposed(Operations, read_only=True)

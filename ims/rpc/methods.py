"""The explicit allow-list of operations Einstein serves over RPC.

Only these names can be called through Pyro4; anything else is refused before any
attribute lookup happens, so private helpers of the operations class are unreachable.
"""
from __future__ import annotations

ALLOWED_METHODS: frozenset[str] = frozenset({
    "check_auth", "is_admin",
    "import_image", "list_images", "provision", "deprovision",
    "create_snapshot", "list_snapshots", "remove_image", "list_provisioned",
    "export_image", "copy_image", "move_image", "node_ip",
    "iscsi_create", "iscsi_remove", "iscsi_list",
    "create_disk", "delete_disk", "provision_disk", "deprovision_disk", "list_disks",
    "list_projects", "create_project", "remove_project",
    "db_list", "db_create", "db_remove", "reconcile",
    "boot_script",
})

# Operations that only an administrator may run (Picasso enforces this; listed here
# so every layer shares one definition).
ADMIN_METHODS: frozenset[str] = frozenset({
    "create_project", "remove_project", "db_create", "db_remove", "reconcile",
})

NAME_PREFIX = "bmi.einstein."
DEFAULT_OPS_FACTORY = "ims.einstein.operations:Operations.from_config"

# Operations that change nothing: the RPC client may re-send one of these to another worker
# when the connection broke after the request may have been sent.  A mutation is never
# re-sent (the worker may have run it); the caller is told so instead.
READ_ONLY_METHODS: frozenset[str] = frozenset({
    "check_auth", "is_admin", "list_images", "list_snapshots", "list_provisioned", "list_disks",
    "iscsi_list", "db_list", "list_projects", "node_ip", "boot_script",
})

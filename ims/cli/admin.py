"""Administration and operations: project, db, iscsi, reconcile, op."""
from __future__ import annotations

from typing import Any

import click

from ims.cli import ops, output
from ims.cli.common import ID, Ctx, change, command, q, queue, table
from ims.picasso.openapi import MAX_ID


# --- projects ------------------------------------------------------------------------------------
@click.group("project")
def project() -> None:
    """Projects registered in BMI (administrators only)."""


@project.command("ls")
@command()
def project_ls(c: Ctx) -> None:
    """List the projects registered in BMI."""
    table(c, ["Id", "Name", "Provision Network"], "/projects")


@project.command("create")
@command("project_name:PROJECT", "network?")
@click.option("--id", "id_", type=ID, default=None, help=f"Use this project id (1 to {MAX_ID}).")
def project_create(c: Ctx, project_name: str, network: str | None, id_: int | None) -> None:
    """Create PROJECT with provisioning NETWORK."""
    change(c, "POST", "/projects", {"name": project_name, "network": network, "id": id_})


@project.command("rm")
@command("project_name:PROJECT")
def project_rm(c: Ctx, project_name: str) -> None:
    """Remove PROJECT."""
    change(c, "DELETE", f"/projects/{q(project_name)}")


# --- the image database ----------------------------------------------------------------------------
@click.group("db")
def db() -> None:
    """The image database (create and rm: administrators only; ls shows the projects you may use)."""


@db.command("ls")
@command()
@click.option("-s", "--snapshots", is_flag=True, help="Show snapshots.")
@click.option("-c", "--clones", is_flag=True, help="Show clones.")
@click.option("-p", "--public", is_flag=True, help="Show public images.")
@click.option("--project", default=None, help="Only this project.")
@click.option("--name", default=None, help="Only images with this name.")
@click.option("--ceph", default=None, help="Only the image with this Ceph name.")
def db_ls(c: Ctx, snapshots: bool, clones: bool, public: bool, project: str | None, name: str | None,
          ceph: str | None) -> None:
    """List image records."""
    params: dict[str, Any] = {"snapshots": str(snapshots).lower(), "clones": str(clones).lower(),
                              "public": str(public).lower()}
    params.update({k: v for k, v in (("project", project), ("name", name), ("ceph", ceph)) if v is not None})
    table(c, ["Id", "Name", "Project", "Ceph", "Public", "Snapshot", "Parent"], "/db/images", params)


@db.command("create")
@command("project_name:PROJECT", "img")
@click.option("--id", "id_", type=ID, default=None, help=f"Use this image id (1 to {MAX_ID}).")
@click.option("--snap", is_flag=True, help="The record is a snapshot.")
@click.option("--parent", default=None, help="Name of the parent image.")
@click.option("--public", is_flag=True, help="The image is public.")
def db_create(c: Ctx, project_name: str, img: str, id_: int | None, snap: bool, parent: str | None,
              public: bool) -> None:
    """Add an image record (database only)."""
    change(c, "POST", "/db/images", {"project": project_name, "name": img, "id": id_, "snapshot": snap,
                                     "parent": parent, "public": public})


@db.command("rm")
@command("project_name:PROJECT", "img")
def db_rm(c: Ctx, project_name: str, img: str) -> None:
    """Remove an image record (database only)."""
    change(c, "DELETE", f"/db/images/{q(project_name)}/{q(img)}")


# --- iSCSI -------------------------------------------------------------------------------------------
@click.group("iscsi")
def iscsi() -> None:
    """iSCSI targets of images (create and rm: administrators only)."""


@iscsi.command("create")
@command("project_name:PROJECT", "img", wait=True)
def iscsi_create(c: Ctx, project_name: str, img: str, no_wait: bool) -> None:
    """Export IMG as an iSCSI target (administrators only); prints the IQN with --json."""
    queue(c, "POST", f"/projects/{q(project_name)}/iscsi", {"image": img}, no_wait)


@iscsi.command("rm")
@command("project_name:PROJECT", "img", wait=True)
def iscsi_rm(c: Ctx, project_name: str, img: str, no_wait: bool) -> None:
    """Remove IMG's iSCSI target (administrators only)."""
    queue(c, "DELETE", f"/projects/{q(project_name)}/iscsi/{q(img)}", None, no_wait)


@iscsi.command("ls")
@command("project_name:PROJECT")
def iscsi_ls(c: Ctx, project_name: str) -> None:
    """List the iSCSI targets of PROJECT."""
    table(c, ["Image", "Target"], f"/projects/{q(project_name)}/iscsi")


# --- administration --------------------------------------------------------------------------------------
@click.command("reconcile")
@command()
@click.option("--repair", is_flag=True, help="Also repair what can be repaired (targets, leftover snapshots).")
def reconcile(c: Ctx, repair: bool) -> None:
    """Compare database, storage, targets and boot files; report drift (administrators only).

    Prints a JSON object of lists (images_without_row, rows_without_image, targets_without_row,
    missing_targets, missing_boot_files, leftover_snapshots, unfinished_operations); all empty means
    nothing to repair.  With --repair the result also has "repaired": true.
    """
    import json

    click.echo(json.dumps(c.api.post("/admin/reconcile", {"repair": repair}), indent=2, sort_keys=True))


# --- asynchronous operations --------------------------------------------------------------------------
@click.group("op")
def op() -> None:
    """Operations: every change (pro, dpro, snap create, import, ...) runs as an operation that BMI queues.

    Commands wait for their operation by default; with --no-wait they print its id, to follow here.
    """


OP_COLUMNS = ["Id", "Verb", "Project", "State", "Queue", "Progress", "Step", "User", "Created", "Error"]


def _op_row(r: dict[str, Any]) -> list[Any]:
    return [r["id"], r.get("verb"), r.get("project"), r.get("state"), r.get("queue_position"),
            f"{int(r.get('progress') or 0)}%", r.get("step"), r.get("user"), r.get("created_at"),
            ops.error_message(r) if r.get("state") == "failed" else None]


@op.command("ls")
@command()
@click.option("--state", type=click.Choice(["queued", "running", "done", "failed"]), default=None,
              help="Only operations in this state.")
@click.option("--project", default=None, help="Only operations of this project.")
@click.option("--json", "as_json", is_flag=True, help="Print the operation records as JSON.")
def op_ls(c: Ctx, state: str | None, project: str | None, as_json: bool) -> None:
    """List the newest operations you may see (administrators: all), newest first."""
    params = {k: v for k, v in (("state", state), ("project", project)) if v is not None}
    records = c.api.get("/operations", params)
    if as_json or c.as_json:
        output.records(records)
    else:
        output.rows(OP_COLUMNS, [_op_row(r) for r in records], False)


@op.command("show")
@command()
@click.argument("op_id", metavar="ID", type=ID)  # typed, so written out
@click.option("--wait", "wait_", is_flag=True, help="Wait for the operation to finish first (progress on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print the operation record as JSON.")
def op_show(c: Ctx, op_id: int, wait_: bool, as_json: bool) -> None:
    """Show operation ID: state, queue position, progress, step, result or error."""
    record = c.api.get(f"/operations/{op_id}")
    if wait_:
        record = ops.wait(c.api, [record])[0]
    if as_json or c.as_json:
        output.records(record)
    else:
        output.fields(record)


COMMANDS = [project, db, iscsi, reconcile, op]

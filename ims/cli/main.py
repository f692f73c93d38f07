"""The ``bmi`` command: the user's guide command tree, talking only to Picasso over HTTP."""
from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from ims.cli import ops, output, transfer
from ims.cli.api import Api, credentials, server_url
from ims.picasso.openapi import MAX_ID

ID = click.IntRange(1, MAX_ID)


class Ctx:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._api: Api | None = None

    @property
    def api(self) -> Api:
        # Built on first use so `--help` and usage errors never need credentials.
        if self._api is None:
            self._api = Api(server_url(), credentials())
        return self._api


pass_ctx = click.make_pass_decorator(Ctx)


def no_wait(f: Any) -> Any:
    """The option every mutation has: queue the operation and print its id instead of waiting."""
    return click.option("--no-wait", is_flag=True,
                        help="Do not wait: print the operation's id (its record with --json) and exit; "
                             "follow it with `bmi op show ID`.")(f)


def finish(c: Ctx, record: dict[str, Any], no_wait_: bool, show_result: bool = False) -> None:
    """Wait for the operation a mutation queued (progress on stderr), then print ``Success`` (or, with
    ``show_result``, the operation's result); a failed operation is an error (exit 1)."""
    if no_wait_:
        output.operation_id(record, c.as_json)
        return
    final = ops.wait(c.api, [record])[0]
    if final["state"] == "failed":
        raise click.ClickException(ops.error_message(final))
    if show_result:
        output.value(final.get("result"), c.as_json)
    else:
        output.success(c.as_json, final.get("result"))


def q(name: str) -> str:
    """One URL path segment.  The server validates names; this only keeps a name from changing the route
    ('/' is quoted, and '.'/'..' would be collapsed by URL normalisation into another resource)."""
    if name in ("", ".", ".."):
        raise click.ClickException(f"invalid name {name!r}")
    return quote(name, safe="")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables (for scripts).")
@click.pass_context
def cli(ctx: click.Context, as_json: bool) -> None:
    """The Bare Metal Imaging (BMI) is a core component of the Massachusetts Open Cloud and an image
    management system (ims) that (1) provisions numerous nodes as quickly as possible while preserving
    support for multitenancy using the Hardware Isolation Layer (HIL) and (2) introduces the image
    management techniques that are supported by virtual machines, with little to no impact on
    application performance.

    Credentials: HIL_USERNAME / HIL_PASSWORD (HAAS_* accepted).  Server: BMI_URL, else [rest_api] of
    BMI_CONFIG (or /etc/bmi/bmiconfig.cfg), else http://127.0.0.1:9000.
    """
    ctx.obj = Ctx(as_json)


# --- images --------------------------------------------------------------------------------------
@cli.command("import")
@click.argument("project")
@click.argument("img")
@click.option("--snap", default=None, help="Import this snapshot of the Ceph image instead of its head.")
@click.option("--protect", is_flag=True, help="Protect the snapshot if it is not yet protected.")
@no_wait
@pass_ctx
def import_(c: Ctx, project: str, img: str, snap: str | None, protect: bool, no_wait: bool) -> None:
    """Import a Ceph image (or one of its snapshots) into PROJECT as IMG."""
    finish(c, c.api.post(f"/projects/{q(project)}/images", {"name": img, "snapshot": snap, "protect": protect}),
           no_wait)


@cli.command("ls")
@click.argument("project")
@pass_ctx
def ls(c: Ctx, project: str) -> None:
    """List the images of PROJECT."""
    names = c.api.get(f"/projects/{q(project)}/images")
    output.rows(["Image"], [[n] for n in names], c.as_json)


@cli.command("rm")
@click.argument("project")
@click.argument("img")
@no_wait
@pass_ctx
def rm(c: Ctx, project: str, img: str, no_wait: bool) -> None:
    """Remove image IMG from PROJECT."""
    finish(c, c.api.delete(f"/projects/{q(project)}/images/{q(img)}"), no_wait)


@cli.command("export")
@click.argument("project")
@click.argument("img")
@click.argument("name")
@no_wait
@pass_ctx
def export(c: Ctx, project: str, img: str, name: str, no_wait: bool) -> None:
    """Export IMG of PROJECT to a new Ceph image NAME."""
    finish(c, c.api.post(f"/projects/{q(project)}/images/{q(img)}/export", {"name": name}), no_wait)


def _transfer(c: Ctx, verb: str, src_project: str, img1: str, dest_project: str, img2: str | None,
              no_wait_: bool) -> None:
    finish(c, c.api.post(f"/projects/{q(src_project)}/images/{q(img1)}/{verb}",
                         {"dest_project": dest_project, "dest_name": img2}), no_wait_)


@cli.command("cp")
@click.argument("src_project")
@click.argument("img1")
@click.argument("dest_project")
@click.argument("img2", required=False)
@no_wait
@pass_ctx
def cp(c: Ctx, src_project: str, img1: str, dest_project: str, img2: str | None, no_wait: bool) -> None:
    """Copy IMG1 of SRC_PROJECT to DEST_PROJECT (as IMG2; to another project: administrators only)."""
    _transfer(c, "copy", src_project, img1, dest_project, img2, no_wait)


@cli.command("mv")
@click.argument("src_project")
@click.argument("img1")
@click.argument("dest_project")
@click.argument("img2", required=False)
@no_wait
@pass_ctx
def mv(c: Ctx, src_project: str, img1: str, dest_project: str, img2: str | None, no_wait: bool) -> None:
    """Move IMG1 of SRC_PROJECT to DEST_PROJECT (as IMG2; to another project: administrators only)."""
    _transfer(c, "move", src_project, img1, dest_project, img2, no_wait)


# --- nodes ---------------------------------------------------------------------------------------
@cli.command("pro")
@click.argument("project")
@click.argument("node")
@click.argument("img")
@click.argument("network")
@click.argument("nic")
@no_wait
@pass_ctx
def pro(c: Ctx, project: str, node: str, img: str, network: str, nic: str, no_wait: bool) -> None:
    """Provision NODE of PROJECT with IMG, connecting NIC to NETWORK.

    Several nodes: give NODE as a comma-separated list (node1,node2,node3; at most 200).  They are
    provisioned as one batch, one operation per node, each with the same IMG, NETWORK and NIC name.
    The command waits for all and prints one line per node, `NODE: Success` or `NODE: failed: why`,
    and exits 1 if any failed (with --no-wait: `NODE ID` per line).
    """
    nodes = [n.strip() for n in node.split(",")]
    if len(nodes) == 1:
        finish(c, c.api.post(f"/projects/{q(project)}/nodes/{q(node)}/provision",
                             {"image": img, "network": network, "nic": nic}), no_wait)
        return
    if "" in nodes:
        raise click.BadParameter("an empty node name in the list", param_hint="NODE")
    records = c.api.post(f"/projects/{q(project)}/provisions",
                         {"nodes": [{"node": n, "image": img, "network": network, "nic": nic} for n in nodes]})
    if no_wait:
        output.operation_ids(nodes, records, c.as_json)
        return
    finals = ops.wait(c.api, records)
    output.batch(nodes, finals, c.as_json)
    failed = [n for n, r in zip(nodes, finals, strict=True) if r["state"] == "failed"]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(nodes)} nodes failed: {', '.join(failed)}")


@cli.command("dpro")
@click.argument("project")
@click.argument("node")
@click.argument("network")
@click.argument("nic")
@no_wait
@pass_ctx
def dpro(c: Ctx, project: str, node: str, network: str, nic: str, no_wait: bool) -> None:
    """Deprovision NODE of PROJECT, detaching NIC from NETWORK.

    NETWORK and NIC must be the ones given to `bmi pro`; the node's NIC is detached only if `pro` attached it.
    """
    finish(c, c.api.post(f"/projects/{q(project)}/nodes/{q(node)}/deprovision", {"network": network, "nic": nic}),
           no_wait)


@cli.command("showpro")
@click.argument("project")
@pass_ctx
def showpro(c: Ctx, project: str) -> None:
    """List the provisioned nodes of PROJECT."""
    output.rows(["Node", "Provisioned Image"], c.api.get(f"/projects/{q(project)}/nodes"), c.as_json)


@cli.group("node")
def node() -> None:
    """Node information."""


@node.command("ip")
@click.argument("project")
@click.argument("node_name", metavar="NODE")
@pass_ctx
def node_ip(c: Ctx, project: str, node_name: str) -> None:
    """Print the IP address of NODE."""
    output.value(c.api.get(f"/projects/{q(project)}/nodes/{q(node_name)}/ip"), c.as_json)


# --- snapshots -----------------------------------------------------------------------------------
@cli.group("snap")
def snap() -> None:
    """Snapshots of provisioned nodes."""


@snap.command("create")
@click.argument("project")
@click.argument("node_name", metavar="NODE")
@click.argument("snap_name")
@no_wait
@pass_ctx
def snap_create(c: Ctx, project: str, node_name: str, snap_name: str, no_wait: bool) -> None:
    """Snapshot NODE's disk as SNAP_NAME.  WARNING: The Node must be in a powered down state."""
    finish(c, c.api.post(f"/projects/{q(project)}/nodes/{q(node_name)}/snapshots", {"name": snap_name}), no_wait)


@snap.command("ls")
@click.argument("project")
@pass_ctx
def snap_ls(c: Ctx, project: str) -> None:
    """List the snapshots of PROJECT."""
    output.rows(["Snapshot", "Parent"], c.api.get(f"/projects/{q(project)}/snapshots"), c.as_json)


@snap.command("rm")
@click.argument("project")
@click.argument("snap_name")
@no_wait
@pass_ctx
def snap_rm(c: Ctx, project: str, snap_name: str, no_wait: bool) -> None:
    """Remove snapshot SNAP_NAME of PROJECT."""
    finish(c, c.api.delete(f"/projects/{q(project)}/snapshots/{q(snap_name)}"), no_wait)


# --- projects ------------------------------------------------------------------------------------
@cli.group("project")
def project() -> None:
    """Projects registered in BMI (administrators only)."""


@project.command("ls")
@pass_ctx
def project_ls(c: Ctx) -> None:
    """List the projects registered in BMI."""
    output.rows(["Id", "Name", "Provision Network"], c.api.get("/projects"), c.as_json)


@project.command("create")
@click.argument("project_name", metavar="PROJECT")
@click.argument("network", required=False)
@click.option("--id", "id_", type=ID, default=None, help=f"Use this project id (1 to {MAX_ID}).")
@pass_ctx
def project_create(c: Ctx, project_name: str, network: str | None, id_: int | None) -> None:
    """Create PROJECT with provisioning NETWORK."""
    c.api.post("/projects", {"name": project_name, "network": network, "id": id_})
    output.success(c.as_json)


@project.command("rm")
@click.argument("project_name", metavar="PROJECT")
@pass_ctx
def project_rm(c: Ctx, project_name: str) -> None:
    """Remove PROJECT."""
    c.api.delete(f"/projects/{q(project_name)}")
    output.success(c.as_json)


# --- the image database ----------------------------------------------------------------------------
@cli.group("db")
def db() -> None:
    """The image database (create and rm: administrators only; ls shows the projects you may use)."""


@db.command("ls")
@click.option("-s", "--snapshots", is_flag=True, help="Show snapshots.")
@click.option("-c", "--clones", is_flag=True, help="Show clones.")
@click.option("-p", "--public", is_flag=True, help="Show public images.")
@click.option("--project", default=None, help="Only this project.")
@click.option("--name", default=None, help="Only images with this name.")
@click.option("--ceph", default=None, help="Only the image with this Ceph name.")
@pass_ctx
def db_ls(c: Ctx, snapshots: bool, clones: bool, public: bool, project: str | None, name: str | None,
          ceph: str | None) -> None:
    """List image records."""
    params: dict[str, Any] = {"snapshots": str(snapshots).lower(), "clones": str(clones).lower(),
                              "public": str(public).lower()}
    params.update({k: v for k, v in (("project", project), ("name", name), ("ceph", ceph)) if v is not None})
    output.rows(["Id", "Name", "Project", "Ceph", "Public", "Snapshot", "Parent"], c.api.get("/db/images", params),
                c.as_json)


@db.command("create")
@click.argument("project_name", metavar="PROJECT")
@click.argument("img")
@click.option("--id", "id_", type=ID, default=None, help=f"Use this image id (1 to {MAX_ID}).")
@click.option("--snap", is_flag=True, help="The record is a snapshot.")
@click.option("--parent", default=None, help="Name of the parent image.")
@click.option("--public", is_flag=True, help="The image is public.")
@pass_ctx
def db_create(c: Ctx, project_name: str, img: str, id_: int | None, snap: bool, parent: str | None,
              public: bool) -> None:
    """Add an image record (database only)."""
    c.api.post("/db/images", {"project": project_name, "name": img, "id": id_, "snapshot": snap, "parent": parent,
                              "public": public})
    output.success(c.as_json)


@db.command("rm")
@click.argument("project_name", metavar="PROJECT")
@click.argument("img")
@pass_ctx
def db_rm(c: Ctx, project_name: str, img: str) -> None:
    """Remove an image record (database only)."""
    c.api.delete(f"/db/images/{q(project_name)}/{q(img)}")
    output.success(c.as_json)


# --- iSCSI -------------------------------------------------------------------------------------------
@cli.group("iscsi")
def iscsi() -> None:
    """iSCSI targets of images (create and rm: administrators only)."""


@iscsi.command("create")
@click.argument("project_name", metavar="PROJECT")
@click.argument("img")
@no_wait
@pass_ctx
def iscsi_create(c: Ctx, project_name: str, img: str, no_wait: bool) -> None:
    """Export IMG as an iSCSI target (administrators only); prints the IQN with --json."""
    finish(c, c.api.post(f"/projects/{q(project_name)}/iscsi", {"image": img}), no_wait)


@iscsi.command("rm")
@click.argument("project_name", metavar="PROJECT")
@click.argument("img")
@no_wait
@pass_ctx
def iscsi_rm(c: Ctx, project_name: str, img: str, no_wait: bool) -> None:
    """Remove IMG's iSCSI target (administrators only)."""
    finish(c, c.api.delete(f"/projects/{q(project_name)}/iscsi/{q(img)}"), no_wait)


@iscsi.command("ls")
@click.argument("project_name", metavar="PROJECT")
@pass_ctx
def iscsi_ls(c: Ctx, project_name: str) -> None:
    """List the iSCSI targets of PROJECT."""
    output.rows(["Image", "Target"], c.api.get(f"/projects/{q(project_name)}/iscsi"), c.as_json)


# --- disks (split API) ---------------------------------------------------------------------------------
@cli.group("disk")
def disk() -> None:
    """Disks: a clone of an image exported over iSCSI, provisioned separately."""


@disk.command("create")
@click.argument("project_name", metavar="PROJECT")
@click.argument("img")
@click.argument("disk_name")
@no_wait
@pass_ctx
def disk_create(c: Ctx, project_name: str, img: str, disk_name: str, no_wait: bool) -> None:
    """Create DISK_NAME from IMG; prints the target name."""
    finish(c, c.api.post(f"/projects/{q(project_name)}/disks", {"name": disk_name, "image": img}), no_wait,
           show_result=True)


@disk.command("delete")
@click.argument("project_name", metavar="PROJECT")
@click.argument("disk_name")
@no_wait
@pass_ctx
def disk_delete(c: Ctx, project_name: str, disk_name: str, no_wait: bool) -> None:
    """Delete DISK_NAME."""
    finish(c, c.api.delete(f"/projects/{q(project_name)}/disks/{q(disk_name)}"), no_wait)


@cli.command("showdisks")
@click.argument("project_name", metavar="PROJECT")
@pass_ctx
def showdisks(c: Ctx, project_name: str) -> None:
    """List the disks of PROJECT."""
    output.rows(["Disk", "Source Image"], c.api.get(f"/projects/{q(project_name)}/disks"), c.as_json)


# --- asynchronous operations --------------------------------------------------------------------------
@cli.group("op")
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
@click.option("--state", type=click.Choice(["queued", "running", "done", "failed"]), default=None,
              help="Only operations in this state.")
@click.option("--project", default=None, help="Only operations of this project.")
@click.option("--json", "as_json", is_flag=True, help="Print the operation records as JSON.")
@pass_ctx
def op_ls(c: Ctx, state: str | None, project: str | None, as_json: bool) -> None:
    """List the newest operations you may see (administrators: all), newest first."""
    params = {k: v for k, v in (("state", state), ("project", project)) if v is not None}
    records = c.api.get("/operations", params)
    if as_json or c.as_json:
        output.records(records)
    else:
        output.rows(OP_COLUMNS, [_op_row(r) for r in records], False)


@op.command("show")
@click.argument("op_id", metavar="ID", type=ID)
@click.option("--wait", "wait_", is_flag=True, help="Wait for the operation to finish first (progress on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print the operation record as JSON.")
@pass_ctx
def op_show(c: Ctx, op_id: int, wait_: bool, as_json: bool) -> None:
    """Show operation ID: state, queue position, progress, step, result or error."""
    record = c.api.get(f"/operations/{op_id}")
    if wait_:
        record = ops.wait(c.api, [record])[0]
    if as_json or c.as_json:
        output.records(record)
    else:
        output.fields(record)


# --- administration --------------------------------------------------------------------------------------
@cli.command("reconcile")
@click.option("--repair", is_flag=True, help="Also repair what can be repaired (targets, leftover snapshots).")
@pass_ctx
def reconcile(c: Ctx, repair: bool) -> None:
    """Compare database, storage, targets and boot files; report drift (administrators only).

    Prints a JSON object of lists (images_without_row, rows_without_image, targets_without_row,
    missing_targets, missing_boot_files, leftover_snapshots, unfinished_operations); all empty means
    nothing to repair.  With --repair the result also has "repaired": true.
    """
    import json

    click.echo(json.dumps(c.api.post("/admin/reconcile", {"repair": repair}), indent=2, sort_keys=True))


transfer.register(cli)  # bmi upload / bmi download (ims/cli/transfer.py)


def main() -> None:
    cli(prog_name="bmi")


if __name__ == "__main__":
    main()

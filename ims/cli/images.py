"""Commands on images and snapshots: import, ls, rm, export, cp, mv, snap."""
from __future__ import annotations

import click

from ims.cli import output
from ims.cli.common import Ctx, finish, no_wait, pass_ctx, q


# --- images --------------------------------------------------------------------------------------
@click.command("import")
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


@click.command("ls")
@click.argument("project")
@pass_ctx
def ls(c: Ctx, project: str) -> None:
    """List the images of PROJECT."""
    names = c.api.get(f"/projects/{q(project)}/images")
    output.rows(["Image"], [[n] for n in names], c.as_json)


@click.command("rm")
@click.argument("project")
@click.argument("img")
@no_wait
@pass_ctx
def rm(c: Ctx, project: str, img: str, no_wait: bool) -> None:
    """Remove image IMG from PROJECT."""
    finish(c, c.api.delete(f"/projects/{q(project)}/images/{q(img)}"), no_wait)


@click.command("export")
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


@click.command("cp")
@click.argument("src_project")
@click.argument("img1")
@click.argument("dest_project")
@click.argument("img2", required=False)
@no_wait
@pass_ctx
def cp(c: Ctx, src_project: str, img1: str, dest_project: str, img2: str | None, no_wait: bool) -> None:
    """Copy IMG1 of SRC_PROJECT to DEST_PROJECT (as IMG2; to another project: administrators only)."""
    _transfer(c, "copy", src_project, img1, dest_project, img2, no_wait)


@click.command("mv")
@click.argument("src_project")
@click.argument("img1")
@click.argument("dest_project")
@click.argument("img2", required=False)
@no_wait
@pass_ctx
def mv(c: Ctx, src_project: str, img1: str, dest_project: str, img2: str | None, no_wait: bool) -> None:
    """Move IMG1 of SRC_PROJECT to DEST_PROJECT (as IMG2; to another project: administrators only)."""
    _transfer(c, "move", src_project, img1, dest_project, img2, no_wait)


# --- snapshots -----------------------------------------------------------------------------------
@click.group("snap")
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


COMMANDS = [import_, ls, rm, export, cp, mv, snap]

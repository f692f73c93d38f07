"""Commands on images and snapshots: import, ls, rm, export, cp, mv, snap."""
from __future__ import annotations

import click

from ims.cli import output
from ims.cli.common import Ctx, command, q, queue, table


# --- images --------------------------------------------------------------------------------------
@click.command("import")
@command("project", "img", wait=True)
@click.option("--snap", default=None, help="Import this snapshot of the Ceph image instead of its head.")
@click.option("--protect", is_flag=True, help="Protect the snapshot if it is not yet protected.")
def import_(c: Ctx, project: str, img: str, snap: str | None, protect: bool, no_wait: bool) -> None:
    """Import a Ceph image (or one of its snapshots) into PROJECT as IMG."""
    queue(c, "POST", f"/projects/{q(project)}/images", {"name": img, "snapshot": snap, "protect": protect}, no_wait)


@click.command("ls")
@command("project")
def ls(c: Ctx, project: str) -> None:
    """List the images of PROJECT."""
    names = c.api.get(f"/projects/{q(project)}/images")
    output.rows(["Image"], [[n] for n in names], c.as_json)


@click.command("rm")
@command("project", "img", wait=True)
def rm(c: Ctx, project: str, img: str, no_wait: bool) -> None:
    """Remove image IMG from PROJECT."""
    queue(c, "DELETE", f"/projects/{q(project)}/images/{q(img)}", None, no_wait)


@click.command("export")
@command("project", "img", "name", wait=True)
def export(c: Ctx, project: str, img: str, name: str, no_wait: bool) -> None:
    """Export IMG of PROJECT to a new Ceph image NAME."""
    queue(c, "POST", f"/projects/{q(project)}/images/{q(img)}/export", {"name": name}, no_wait)


def _transfer(c: Ctx, verb: str, src_project: str, img1: str, dest_project: str, img2: str | None,
              no_wait_: bool) -> None:
    queue(c, "POST", f"/projects/{q(src_project)}/images/{q(img1)}/{verb}",
          {"dest_project": dest_project, "dest_name": img2}, no_wait_)


@click.command("cp")
@command("src_project", "img1", "dest_project", "img2?", wait=True)
def cp(c: Ctx, src_project: str, img1: str, dest_project: str, img2: str | None, no_wait: bool) -> None:
    """Copy IMG1 of SRC_PROJECT to DEST_PROJECT (as IMG2; to another project: administrators only)."""
    _transfer(c, "copy", src_project, img1, dest_project, img2, no_wait)


@click.command("mv")
@command("src_project", "img1", "dest_project", "img2?", wait=True)
def mv(c: Ctx, src_project: str, img1: str, dest_project: str, img2: str | None, no_wait: bool) -> None:
    """Move IMG1 of SRC_PROJECT to DEST_PROJECT (as IMG2; to another project: administrators only)."""
    _transfer(c, "move", src_project, img1, dest_project, img2, no_wait)


# --- snapshots -----------------------------------------------------------------------------------
@click.group("snap")
def snap() -> None:
    """Snapshots of provisioned nodes."""


@snap.command("create")
@command("project", "node_name:NODE", "snap_name", wait=True)
def snap_create(c: Ctx, project: str, node_name: str, snap_name: str, no_wait: bool) -> None:
    """Snapshot NODE's disk as SNAP_NAME.  WARNING: The Node must be in a powered down state."""
    queue(c, "POST", f"/projects/{q(project)}/nodes/{q(node_name)}/snapshots", {"name": snap_name}, no_wait)


@snap.command("ls")
@command("project")
def snap_ls(c: Ctx, project: str) -> None:
    """List the snapshots of PROJECT."""
    table(c, ["Snapshot", "Parent"], f"/projects/{q(project)}/snapshots")


@snap.command("rm")
@command("project", "snap_name", wait=True)
def snap_rm(c: Ctx, project: str, snap_name: str, no_wait: bool) -> None:
    """Remove snapshot SNAP_NAME of PROJECT."""
    queue(c, "DELETE", f"/projects/{q(project)}/snapshots/{q(snap_name)}", None, no_wait)


COMMANDS = [import_, ls, rm, export, cp, mv, snap]

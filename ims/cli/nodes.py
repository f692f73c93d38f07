"""Commands on nodes and disks: pro, dpro (both forms of each), showpro, node ip, disk, showdisks."""
from __future__ import annotations

import click

from ims.cli import ops, output
from ims.cli.common import Ctx, command, q, queue, table

# --- nodes ---------------------------------------------------------------------------------------
# `pro` and `dpro` take the guide's forms and the last original version's disk forms (split API), told
# apart by the number of arguments, as the original CLI versions' users typed them.
PRO_FORMS = "PROJECT NODE IMG NETWORK NIC  |  PROJECT NODE DISK NIC"
DPRO_FORMS = "PROJECT NODE NETWORK NIC  |  PROJECT NODE NIC"


def _arguments(args: tuple[str, ...], forms: dict[int, str]) -> None:
    if len(args) not in forms:
        raise click.UsageError(f"expected {' or '.join(forms.values())} ({' or '.join(map(str, forms))} "
                               f"arguments), got {len(args)}")


@click.command("pro")
@command(wait=True)
@click.argument("args", nargs=-1, metavar=PRO_FORMS)
def pro(c: Ctx, args: tuple[str, ...], no_wait: bool) -> None:
    """Provision NODE of PROJECT with IMG, connecting NIC to NETWORK.

    Several nodes: give NODE as a comma-separated list (node1,node2,node3; at most 200).  They are
    provisioned as one batch, one operation per node, each with the same IMG, NETWORK and NIC name.
    The command waits for all and prints one line per node, `NODE: Success` or `NODE: failed: why`,
    and exits 1 if any failed (with --no-wait: `NODE ID` per line).

    With four arguments (PROJECT NODE DISK NIC): boot NODE from DISK, a disk made by `bmi disk create`
    (its NIC is not moved to another network).
    """
    _arguments(args, {5: "PROJECT NODE IMG NETWORK NIC", 4: "PROJECT NODE DISK NIC"})
    if len(args) == 4:
        project, node_, disk_, nic = args
        if "," in node_:
            raise click.BadParameter("a disk boots one node: give one NODE", param_hint="NODE")
        queue(c, "POST", f"/projects/{q(project)}/nodes/{q(node_)}/provision", {"disk": disk_, "nic": nic}, no_wait)
        return
    project, node_, img, network, nic = args
    nodes = [n.strip() for n in node_.split(",")]
    if len(nodes) == 1:
        queue(c, "POST", f"/projects/{q(project)}/nodes/{q(node_)}/provision",
              {"image": img, "network": network, "nic": nic}, no_wait)
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


@click.command("dpro")
@command(wait=True)
@click.argument("args", nargs=-1, metavar=DPRO_FORMS)
def dpro(c: Ctx, args: tuple[str, ...], no_wait: bool) -> None:
    """Deprovision NODE of PROJECT, detaching NIC from NETWORK.

    NETWORK and NIC must be the ones given to `bmi pro`; the node's NIC is detached only if `pro` attached it.

    With three arguments (PROJECT NODE NIC): stop booting NODE from its disk (`bmi pro PROJECT NODE DISK
    NIC`); the disk stays, remove it with `bmi disk delete`.
    """
    _arguments(args, {4: "PROJECT NODE NETWORK NIC", 3: "PROJECT NODE NIC"})
    if len(args) == 3:
        project, node_, nic = args
        body = {"nic": nic}
    else:
        project, node_, network, nic = args
        body = {"network": network, "nic": nic}
    queue(c, "POST", f"/projects/{q(project)}/nodes/{q(node_)}/deprovision", body, no_wait)


@click.command("showpro")
@command("project")
def showpro(c: Ctx, project: str) -> None:
    """List the provisioned nodes of PROJECT."""
    table(c, ["Node", "Provisioned Image"], f"/projects/{q(project)}/nodes")


@click.group("node")
def node() -> None:
    """Node information."""


@node.command("ip")
@command("project", "node_name:NODE")
def node_ip(c: Ctx, project: str, node_name: str) -> None:
    """Print the IP address of NODE."""
    output.value(c.api.get(f"/projects/{q(project)}/nodes/{q(node_name)}/ip"), c.as_json)


# --- disks (split API) ---------------------------------------------------------------------------------
@click.group("disk")
def disk() -> None:
    """Disks: a clone of an image exported over iSCSI, provisioned separately."""


@disk.command("create")
@command("project_name:PROJECT", "img", "disk_name", wait=True)
def disk_create(c: Ctx, project_name: str, img: str, disk_name: str, no_wait: bool) -> None:
    """Create DISK_NAME from IMG; prints the target name."""
    queue(c, "POST", f"/projects/{q(project_name)}/disks", {"name": disk_name, "image": img}, no_wait,
          show_result=True)


@disk.command("delete")
@command("project_name:PROJECT", "disk_name", wait=True)
def disk_delete(c: Ctx, project_name: str, disk_name: str, no_wait: bool) -> None:
    """Delete DISK_NAME."""
    queue(c, "DELETE", f"/projects/{q(project_name)}/disks/{q(disk_name)}", None, no_wait)


@click.command("showdisks")
@command("project_name:PROJECT")
def showdisks(c: Ctx, project_name: str) -> None:
    """List the disks of PROJECT."""
    table(c, ["Disk", "Source Image"], f"/projects/{q(project_name)}/disks")


COMMANDS = [pro, dpro, showpro, node, disk, showdisks]

"""The steps of the guide's Figure A.1, against the real `bmi`, `rbd` and `tgtadm`."""
from __future__ import annotations

from typing import Any

from behave import step
from uatlib import commands as c


@step("RBD will create an image")
def rbd_create_image(context: Any) -> None:
    for row in c.expanded_rows(context.table):
        image = row["image_name"]
        # Never adopt an image that was there before: the rollback would then delete someone else's image.
        assert image not in c.rbd_ls(), f"Ceph already has an image {image}; remove it or pick another name"
        result = c.rbd("create", image, "--size", "1", "--image-format", "2")
        assert result.rc == 0, result.describe()
        context.journal.record("rbd_create", image)
        assert image in c.rbd_ls(), f"`rbd ls` does not show {image} after `rbd create`"


@step("BMI log line-count will be measured at the beginning")
def log_count_begin(context: Any) -> None:
    context.log_lines_begin = c.log_line_count()


@step("BMI log line-count will be measured at the end")
def log_count_end(context: Any) -> None:
    end = c.log_line_count()
    assert end > context.log_lines_begin, (f"BMI's log did not grow ({context.log_lines_begin} -> {end} lines in "
                                           f"{', '.join(map(str, c.log_files()))})")


@step("BMI will import an image")
def bmi_import(context: Any) -> None:
    for row in c.expanded_rows(context.table):
        image, project = row["image_name"], row["project_name"]
        c.bmi_success("import", project, image)
        context.journal.record("bmi_import", project, image)
        ceph = c.db_table_ceph(image, project)
        assert ceph, f"`bmi db ls` has no row for {image} in {project}"
        assert ceph != image, f"BMI must work on a clone, not on the golden image {image}"
        assert ceph in c.rbd_ls(), f"the Ceph column of {image} ({ceph}) is not an image `rbd ls` shows"
        context.clones[image] = ceph


@step("BMI will provision a node")
def bmi_provision(context: Any) -> None:
    for row in c.expanded_rows(context.table):
        image, project, network = row["image_name"], row["project_name"], row["network_name"]
        node, nic = row["node_name"], row["NIC"]
        c.bmi_success("pro", project, node, image, network, nic)
        context.journal.record("bmi_pro", project, node, network, nic)
        record = c.db_row(node, project)
        assert record is not None, f"`bmi db ls` has no record for the provisioned node {node}"
        assert record["parent"] == image, f"{node}'s parent is {record['parent']!r}, not {image}"
        clone = record["ceph"]
        assert clone in c.rbd_ls(), f"{node}'s clone {clone} is not in `rbd ls`"
        targets = c.targets_backed_by(clone)
        assert len(targets) == 1, f"expected one tgt target backed by {clone}, found {targets}"
        context.clones[node] = clone


@step("BMI will create a snapshot of a node")
def bmi_snapshot(context: Any) -> None:
    for row in c.expanded_rows(context.table):
        project, node, snap = row["project_name"], row["node_name"], row["snapshot_name"]
        c.bmi_success("snap", "create", project, node, snap)
        context.journal.record("bmi_snap", project, snap)
        record = c.db_row(snap, project)
        assert record is not None and record["snapshot"] is True, f"no snapshot record {snap}: {record}"
        context.clones[snap] = record["ceph"]
        context.snapshot_project = project


@step("RBD will confirm the snapshot exists")
def rbd_snapshot_exists(context: Any) -> None:
    for row in c.expanded_rows(context.table):
        snap = row["snapshot_name"]
        ceph = c.db_table_ceph(snap, context.snapshot_project)
        assert ceph, f"`bmi db ls` has no row for snapshot {snap}"
        assert ceph == context.clones[snap]
        assert ceph in c.rbd_ls(), f"snapshot {snap}'s Ceph image {ceph} is not in `rbd ls`"


@step("BMI will remove a snapshot")
def bmi_remove_snapshot(context: Any) -> None:
    for row in c.expanded_rows(context.table):
        snap, project = row["snapshot_name"], row["project_name"]
        c.bmi_success("snap", "rm", project, snap)
        context.journal.forget("bmi_snap", project, snap)
        assert c.db_row(snap, project) is None, f"snapshot {snap} is still in `bmi db ls`"
        ceph = context.clones.get(snap)
        if ceph:
            assert ceph not in c.rbd_ls(), f"snapshot {snap}'s Ceph image {ceph} is still in `rbd ls`"


@step("BMI will deprovision a node")
def bmi_deprovision(context: Any) -> None:
    for row in c.expanded_rows(context.table):
        project, network, node, nic = row["project_name"], row["network_name"], row["node_name"], row["NIC"]
        c.bmi_success("dpro", project, node, network, nic)
        context.journal.forget("bmi_pro", project, node, network, nic)
        assert c.db_row(node, project) is None, f"node {node} is still in `bmi db ls`"
        clone = context.clones.get(node)
        assert clone, "the scenario did not provision this node"
        assert clone not in c.rbd_ls(), f"{node}'s clone {clone} is still in `rbd ls`"
        assert not c.targets_backed_by(clone), f"a tgt target still exports {clone}"


@step("BMI will remove an image")
def bmi_remove_image(context: Any) -> None:
    for row in c.expanded_rows(context.table):
        image, project = row["image_name"], row["project_name"]
        c.bmi_success("rm", project, image)
        context.journal.forget("bmi_import", project, image)
        assert c.db_row(image, project) is None, f"image {image} is still in `bmi db ls`"


@step("RBD will confirm the removed image's clone")
def rbd_clone_removed(context: Any) -> None:
    for row in c.expanded_rows(context.table):
        image = row["image_name"]
        clone = context.clones.get(image)
        assert clone, f"the scenario did not import {image}"
        assert clone not in c.rbd_ls(), f"{image}'s clone {clone} is still in `rbd ls` after `bmi rm`"
        assert image in c.rbd_ls(), f"`bmi rm` must not touch the golden image {image}"


@step("RBD will remove the created image")
def rbd_remove_image(context: Any) -> None:
    for row in c.expanded_rows(context.table):
        image = row["image_name"]
        result = c.rbd("rm", image)
        assert result.rc == 0 and "done" in result.stdout + result.stderr, result.describe()
        context.journal.forget("rbd_create", image)
        assert image not in c.rbd_ls(), f"{image} is still in `rbd ls` after `rbd rm`"

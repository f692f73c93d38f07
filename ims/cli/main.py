"""The ``bmi`` command: the user's guide command tree, talking only to Picasso over HTTP.

The commands live in modules by subject (images, nodes, admin); each lists its commands in ``COMMANDS``.
Registration point: a new module registers its commands below, one ``cli.add_command(...)`` each.
"""
from __future__ import annotations

import click

from ims.cli import admin, images, nodes, transfer
from ims.cli.api import CA_VAR, remember_ca
from ims.cli.common import Ctx


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables (for scripts).")
@click.option("--ca", metavar="PATH", expose_value=False, callback=remember_ca,
              help=f"Verify BMI's HTTPS certificate against these CA certificates (PEM); default ${CA_VAR}.")
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


for _module in (images, nodes, admin):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


transfer.register(cli)  # bmi upload / bmi download (ims/cli/transfer.py)


def main() -> None:
    cli(prog_name="bmi")


if __name__ == "__main__":
    main()

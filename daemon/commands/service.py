"""`gitlora service install|uninstall`: the systemd user unit."""
from __future__ import annotations

import argparse

from .. import service_unit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("service", help="install or remove the systemd user service")
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("--no-systemctl", action="store_true", help="only write the unit; print the commands")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "install":
        report = service_unit.install_unit(run_systemctl=not args.no_systemctl)
    else:
        report = service_unit.uninstall_unit(run_systemctl=not args.no_systemctl)
    print(report.summary())
    return 1 if report.error else 0

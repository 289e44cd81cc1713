"""The `qkdgw` command. `qkdgw ha notify` (keepalived's notify, on the failover path) starts
on the standard library alone; everything else is the full CLI (gateway/cli.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:2] == ["ha", "notify"] and not {"-h", "--help"} & set(args):
        from gateway.hanotify import main as notify

        return notify(args[2:])
    from gateway.cli import main as cli

    return cli(args)

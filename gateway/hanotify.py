"""`qkdgw ha notify`: what keepalived's `notify` runs on every VRRP state change.

It is on the failover path: keepalived has just moved the site's addresses, and the new
active node keys nothing until its daemon hears of it. So it starts on the standard library
alone (about 50 ms; the full CLI takes half a second): it records the state in
STATE_DIR/ha/keepalived.json (a daemon that starts later takes it from there, if the
keepalived that said it still runs) and tells the running daemon over its admin socket.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from pathlib import Path

from gateway.ha import Notification, keepalived_ancestor

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: The daemon answers once it has taken the role: becoming standby removes every sink's
#: keys (a strongSwan sink terminates its SAs), which may take seconds on a hub.
ANSWER_TIMEOUT = 60.0

DESCRIPTION = """\
Tell this node's daemon what keepalived says: keepalived's `notify` runs it with
TYPE NAME STATE [PRIORITY] appended (INSTANCE site_a MASTER 150). MASTER makes the node
active (it starts a new epoch on every link); BACKUP, FAULT and STOP make it standby (it
lets its links go and removes every key it installed). The state is also recorded in
STATE_DIR/ha/keepalived.json: a daemon started later takes it from there while the
keepalived that said it still runs. In keepalived.conf (docs/ha.md):

  notify "/path/to/qkdgw ha notify --state-dir /var/lib/qkdgw"

--state-dir is the fast form (the admin socket is STATE_DIR/admin.sock); -c reads the
site configuration instead (slower on a hub's large file)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", type=Path, metavar="SITE.yaml",
                       help="the site configuration (its state_dir and admin socket)")
    where.add_argument("--state-dir", type=Path, metavar="DIR",
                       help="the site's state_dir (admin socket DIR/admin.sock)")
    p.add_argument("type", metavar="TYPE", help="INSTANCE or GROUP")
    p.add_argument("name", metavar="NAME", help="the VRRP instance or group")
    p.add_argument("state", metavar="STATE", help="MASTER, BACKUP, FAULT or STOP")
    p.add_argument("priority", metavar="PRIORITY", nargs="?", help="its priority")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qkdgw ha notify", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def main(argv: list[str]) -> int:
    return run(parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    notify = [args.type, args.name, args.state] + ([args.priority] if args.priority else [])
    ancestor = keepalived_ancestor()
    try:
        n = Notification.parse(notify, at=time.time(), pid=ancestor[0] if ancestor else None,
                               started=ancestor[1] if ancestor else None)
    except ValueError as e:
        print(f"qkdgw ha notify: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.state_dir is not None:
        state_dir, sock = args.state_dir, args.state_dir / "admin.sock"
    else:
        from common.config import ConfigError
        from gateway.site import SiteConfig

        try:
            site = SiteConfig.load(args.config)
        except ConfigError as e:
            print(f"qkdgw ha notify: {e}", file=sys.stderr)
            return EXIT_USAGE
        state_dir, sock = site.state_dir, site.admin_socket
    try:
        n.save(state_dir)
    except OSError as e:
        print(f"qkdgw ha notify: cannot record the state in {state_dir}: {e}", file=sys.stderr)
        return EXIT_FAILED
    body: dict[str, object] = {"args": notify, "keepalived_pid": n.keepalived_pid,
            "keepalived_started": n.keepalived_started}
    try:
        status, answer = _post(sock, "/ha", body)
    except TimeoutError:
        print(f"qkdgw ha notify: {n.state} recorded, but the daemon on {sock} did not answer"
              f" within {ANSWER_TIMEOUT:g} s", file=sys.stderr)
        return EXIT_FAILED
    except (ConnectionRefusedError, FileNotFoundError):
        print(f"{n.state}: recorded; no daemon answers on {sock} (it takes this role when it"
              " starts)", file=sys.stderr)
        return EXIT_OK
    except (OSError, http.client.HTTPException) as e:
        print(f"qkdgw ha notify: {n.state} recorded, but telling the daemon on {sock}"
              f" failed: {e or type(e).__name__}", file=sys.stderr)
        return EXIT_FAILED
    if status != 200:
        print(f"qkdgw ha notify: the daemon refused it: {answer.get('error', status)}",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"node {answer.get('node')}: {answer.get('role')} (keepalived {n.name}: {n.state})")
    return EXIT_OK


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("qkdgw", timeout=ANSWER_TIMEOUT)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _post(sock: Path, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    conn = _UnixConnection(sock)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {}
    return r.status, answer if isinstance(answer, dict) else {}

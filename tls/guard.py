"""`qkdgw tls-guard -c SITE.yaml`: the tls_psk sink's backstop for when the gateway is gone.

The sink writes each identity's deadline (its epoch's hard lifetime) to FILE.expiry
(tls/expiry.py). The guard is a process of its own beside the TLS service (its own systemd
unit, or started with the service), so it outlives a killed gateway: for each tls_psk sink
of the site it removes every identity from FILE at its deadline (one without a deadline at
once), leaves the placeholder when none is left (or no file is there yet: the service can
start before the gateway), and reloads the service as the sink does (SIGHUP through
`reload_pid_file`, the `hook` with QKDGW_EVENT=expire). It wakes at the earliest deadline and
at least every second (to see new deadlines), and changes the files only under FILE.lock,
like the sink. `--once` is one pass without a reload, for before the service starts
(ExecStartPre=): it then never reads an expired identity.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.config import ConfigError
from common.files import write_private
from common.sink import SinkError
from tls import expiry, pskfile
from tls.hook import run_hook, sighup
from tls.sink import TlsPskSinkConfig

log = logging.getLogger(__name__)

#: At least this often the guard looks at the files, for deadlines newer than its last look.
POLL = 1.0


@dataclass
class Target:
    link: str
    config: TlsPskSinkConfig
    reload_due: bool = False  # removed something and not yet reloaded the service
    problems: set[str] = field(default_factory=set)  # logged, and still so: not again

    def problem(self, what: str) -> None:
        if what not in self.problems:
            self.problems.add(what)
            log.error("link %s: %s", self.link, what)


def targets(sinks: Sequence[tuple[str, TlsPskSinkConfig]], config: str) -> list[Target]:
    """What to guard: the site's tls_psk sinks, as (link, sink) pairs (their configuration
    made sure no two share a file); an error if there is none."""
    if not sinks:
        raise ConfigError(f"{config}: no tls_psk sink: nothing to guard")
    return [Target(link, sink) for link, sink in sinks]


def sweep(target: Target, now: float) -> tuple[list[str], float | None]:
    """Remove from the target's file what is past its deadline or has none: the identities
    removed, and the earliest deadline of those left."""
    path = target.config.path
    with expiry.locked(path):
        try:
            found = pskfile.loads(path.read_bytes())
        except (FileNotFoundError, pskfile.PskFileError) as e:
            # No file yet: the service can start before the gateway. Unreadable: fail
            # closed, nothing in it can be checked.
            if not isinstance(e, FileNotFoundError):
                target.problem(f"{path}: {e}: replaced by the placeholder")
                target.reload_due = True
            write_private(path, pskfile.dumps([pskfile.placeholder(target.link)]))
            return [], None
        try:
            deadlines = expiry.read(path)
        except expiry.ExpiryError as e:
            target.problem(f"{e}: every identity in {path} counts as expired")
            deadlines = {}
        left = [(i, k) for i, k in found if deadlines.get(i, 0.0) > now]
        gone = [i for i, _ in found
                if deadlines.get(i, 0.0) <= now and not pskfile.PLACEHOLDER.match(i)]
        if gone:
            write_private(path, pskfile.dumps(left or [pskfile.placeholder(target.link)]))
    return gone, min((deadlines[i] for i, _ in left), default=None)


async def reload(target: Target) -> bool:
    """Tell the service, as the sink would; whether that worked (else: again next time)."""
    c = target.config
    try:
        if c.reload_pid_file is not None:
            sighup(c.reload_pid_file)  # not running: it reads the file when it starts
        if c.hook:
            first = pskfile.loads(c.path.read_bytes())[0][0]
            await run_hook(c.hook, {
                "QKDGW_EVENT": "expire", "QKDGW_LINK": target.link, "QKDGW_EPOCH": "0",
                "QKDGW_PSK_IDENTITY": "" if pskfile.PLACEHOLDER.match(first) else first,
                "QKDGW_KEY_FILE": str(c.path)}, c.hook_timeout)
    except (SinkError, OSError, pskfile.PskFileError) as e:
        target.problem(f"{c.path} changed, but the service was not told: {e}")
        return False
    target.problems.clear()
    return True


async def run(found: list[Target], *, once: bool) -> None:
    """Guard FOUND until killed (or one pass with ONCE)."""
    if not once:
        for t in found:
            if expiry.hold_guard(t.config.path) is None:  # held until this process ends
                raise SinkError(f"another qkdgw tls-guard guards {t.config.path}")
            log.info("link %s: guarding %s: each identity ends at its deadline in %s", t.link,
                     t.config.path, expiry.beside(t.config.path, expiry.EXPIRY))
    while True:
        now = time.time()
        wake = now + POLL
        for t in found:
            try:
                gone, earliest = sweep(t, now)
            except OSError as e:
                t.problem(f"{t.config.path}: {e.strerror or e}")
                continue
            if gone:
                log.warning("link %s: %s: removed %s (past the deadline, or none)", t.link,
                            t.config.path, ", ".join(gone))
                t.reload_due = True
            if t.reload_due and not once:
                t.reload_due = not await reload(t)
            if earliest is not None:
                wake = min(wake, earliest)
        if once:
            return
        await asyncio.sleep(max(0.0, wake - time.time()))

"""Hold the IKE responder's outgoing tunnel traffic while a new IKE SA comes up.

strongSwan's IKE responder installs both directions of a new CHILD SA while it handles the
IKE_AUTH request and sends on it at once; the initiator can decrypt that only after it has
handled the response. With kernel-libipsec, plaintext bound for the tunnel leaves the
kernel through charon's TUN device (`ipsec0`), so the responder's gateway can hold it there
for that moment: from before it answers the Offer (before IKE_SA_INIT) until the Commit,
which the initiator sends only once its new CHILD SAs are installed. The packets wait in
the kernel (NFQUEUE, metadata only, in order) and then go out on the new SA; none meets
a peer that cannot decrypt it.

    iptables -t mangle:  POSTROUTING -j QKDGW-HOLD-<hash of the link name>
                         QKDGW-HOLD-...: -o ipsec0 -j NFQUEUE --queue-num N --queue-bypass

The gateway binds queue N for as long as it runs, fail-open with room for no packet: every
packet passes straight through, in the kernel. A hold gives the queue room (one netlink
message); the release accepts what it holds and takes the room away again. If the gateway
is gone, `--queue-bypass` lets traffic through unheld (on whatever SA charon picks, as
without a hold). A hold is bounded by `max_time`. Traffic only ever leaves through charon's
tunnel: holding never sends anything in clear.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import socket
import time
import zlib

from pydantic import Field

from common.config import ConfigModel
from ipsec.nfqueue import NfQueueError, NfQueueSocket

log = logging.getLogger(__name__)

#: Packets held at most: ~3 s of kernel-libipsec's ceiling (~40 Mbit/s of full-size
#: packets). Beyond that the queue lets packets through instead of dropping them.
MAX_PACKETS = 10_000
#: iptables waits this long for the xtables lock another program holds.
IPTABLES_WAIT = 5


class HoldConfig(ConfigModel):
    device: str = Field(default="ipsec0", min_length=1, max_length=15,
                        description="kernel-libipsec's TUN device (charon.plugins."
                                    "kernel-libipsec); without it there is nothing to hold")
    queue: int | None = Field(default=None, ge=0, le=65535,
                              description="NFQUEUE number (default: 0x7100 + a hash of the"
                                          " link name)")
    max_time: float = Field(default=2.0, gt=0, le=10,
                            description="seconds a hold may last: it takes ~10 ms on a LAN,"
                                        " about a second over a 300 ms path")


def chain_name(link: str) -> str:
    """iptables chain names are at most 28 characters: a link name may be longer."""
    return "QKDGW-HOLD-" + hashlib.sha256(link.encode()).hexdigest()[:12]


class HoldUnavailable(Exception):
    pass


class ResponderHold:
    """One link's hold: the IKE responder's sink holds from its inbound install (before the
    Accept) to its outbound activation (the Commit)."""

    def __init__(self, link: str, config: HoldConfig) -> None:
        self.link, self.config = link, config
        self.chain = chain_name(link)
        self.queue = config.queue if config.queue is not None else \
            0x7100 + (zlib.crc32(link.encode()) & 0xFF)
        self.sock: NfQueueSocket | None = None  # bound, passing everything, between holds
        self.started = False  # the chain exists (or could not be made: said once)
        self._since: float | None = None
        self._seen_before = 0
        self._expiry: asyncio.Task[None] | None = None
        self._why = ""

    @property
    def holding(self) -> bool:
        return self._since is not None

    async def start(self) -> None:
        """Bind the queue (passing everything) and install the rule; if this host cannot,
        say why once and carry on without holding."""
        self.started = True
        try:
            if shutil.which("iptables") is None:
                raise HoldUnavailable("iptables not found (apt-get install iptables)")
            await self._bind()
            if await _iptables("-N", self.chain, check=False):
                await _iptables("-F", self.chain)  # left by a previous run
            await _iptables("-A", self.chain, "-o", self.config.device, "-j", "NFQUEUE",
                            "--queue-num", str(self.queue), "--queue-bypass")
            if await _iptables("-C", "POSTROUTING", "-j", self.chain, check=False):
                await _iptables("-I", "POSTROUTING", "1", "-j", self.chain)
        except HoldUnavailable as e:
            self._unbind()
            log.warning("link %s: cannot hold traffic during rotations (%s): the IKE"
                        " responder may lose about a packet per rotation, see"
                        " docs/strongswan.md", self.link, e)

    async def hold(self, why: str) -> bool:
        """Start holding, if there is a kernel-libipsec device; ended by `release`, or
        after max_time. A new attempt while holding (its predecessor got no Commit) holds
        on, timed afresh."""
        if not self.holding:
            try:
                socket.if_nametoindex(self.config.device)
            except OSError:
                log.debug("link %s: no %s (not kernel-libipsec): nothing to hold",
                          self.link, self.config.device)
                return False
            if not self.started:
                await self.start()
            sock = self.sock
            if sock is None:
                return False
            try:
                await sock.set_maxlen(MAX_PACKETS)
            except NfQueueError as e:
                log.warning("link %s: hold failed: %s", self.link, e)
                return False
            self._since, self._seen_before = time.monotonic(), sock.seen
            # Read the notices as they come: they say which packets to accept at the end.
            # (Requests read the socket themselves: none is made until the release.)
            asyncio.get_running_loop().add_reader(sock.fileno(), sock.drain)
        if self._expiry is not None:
            self._expiry.cancel()
        self._why = why
        self._expiry = asyncio.create_task(self._expire(), name=f"hold-{self.link}")
        return True

    async def _expire(self) -> None:
        await asyncio.sleep(self.config.max_time)
        self._expiry = None  # not cancelled by the release below
        await self.release(f"no Commit after {self.config.max_time:g} s")

    async def release(self, why: str) -> None:
        since, sock = self._since, self.sock
        if since is None or sock is None:
            return  # not holding
        held_for = time.monotonic() - since
        self._since = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        asyncio.get_running_loop().remove_reader(sock.fileno())
        try:
            # What is held goes first; then no room, so what comes passes straight through;
            # then what was queued in between. Nothing overtakes a held packet but in the
            # moment between the last two steps.
            sock.drain()
            await sock.accept_all(MAX_PACKETS)
            await sock.set_maxlen(0)
            sock.drain()
            await sock.accept_all(MAX_PACKETS)
        except (NfQueueError, OSError) as e:
            # The queue is in an unknown state: a new binding lets everything through (what
            # the old one still holds is dropped).
            log.error("link %s: release failed (%s): binding the queue afresh", self.link, e)
            self._unbind()
            try:
                await self._bind()
            except HoldUnavailable as e2:
                log.error("link %s: %s: no more holds", self.link, e2)
        log.info("link %s: held %d packet(s) for %.0f ms (%s, released: %s)", self.link,
                 sock.seen - self._seen_before, held_for * 1000, self._why, why)

    async def close(self) -> None:
        await self.release("the gateway stops")
        if not self.started:
            return
        self.started = False
        await _iptables("-D", "POSTROUTING", "-j", self.chain, check=False)
        await _iptables("-F", self.chain, check=False)
        await _iptables("-X", self.chain, check=False)
        self._unbind()

    async def _bind(self) -> None:
        try:
            self.sock = NfQueueSocket(self.queue)
            await self.sock.bind(0)
        except (OSError, NfQueueError) as e:
            self._unbind()
            raise HoldUnavailable(f"NFQUEUE {self.queue}: {e}") from None

    def _unbind(self) -> None:
        if self.sock is not None:
            self.sock.close()  # unbinds the queue
            self.sock = None


async def _iptables(*args: str, check: bool = True) -> int:
    """Run iptables on the mangle table; its exit status (raises if `check` and not 0)."""
    proc = await asyncio.create_subprocess_exec(
        "iptables", "-w", str(IPTABLES_WAIT), "-t", "mangle", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if check and proc.returncode:
        raise HoldUnavailable(f"iptables -t mangle {' '.join(args)}: "
                              f"{err.decode(errors='replace').strip()}")
    return proc.returncode or 0

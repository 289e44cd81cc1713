"""The `xfrm` sink: ESP SAs and policies in the Linux kernel, rolled over make-before-break.

    sinks:
      - type: xfrm
        mode: tunnel                  # tunnel | transport
        local: 192.0.2.1              # this gateway's ESP endpoint
        remote: 198.51.100.1          # the peer gateway's
        local_subnets: [10.1.0.0/16, "fd00:1::/64"]
        remote_subnets: [10.2.0.0/16, "fd00:2::/64"]

Per epoch, AES-256-GCM (rfc4106) with the key schedule's ESP keys, one SA each way:
- `install_inbound`: the SA the peer will send on (SPI `spi_in`). Inbound and forward
  policies accept ESP with the link's inbound reqid, so old and new inbound SAs both work.
- `activate_outbound`: the new outbound SA with a reqid of its own, then the `out`
  policies repointed to that reqid (XFRM_MSG_UPDPOLICY replaces a policy in one step).
  Two outbound SAs behind one reqid would leave the choice to the kernel's bundle cache.
- `retire_*`: the old SAs deleted, after the core's grace period.
- `block` (and before the first key): the `out` policies become BLOCK; inbound policies
  always require ESP. Traffic between the subnets is dropped, never sent in clear.

The kernel enforces the rest on its own: every SA has a hard lifetime a little beyond the
link's hard lifetime, so a dead daemon's keys expire and traffic stops (the policies stay
and drop it). Soft byte, packet or time limits and missing SAs (ACQUIRE) make the link
rekey at once. On stop the SAs are deleted and the policies left blocking (`on_stop:
block`, the default) or removed (`on_stop: remove`, for decommissioning).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import zlib
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, IPvAnyAddress, model_validator

from common.config import MAX_SECONDS, ConfigModel
from common.sink import (
    EpochMaterial,
    EpochRef,
    RekeyCause,
    SinkConfig,
    SinkContext,
    SinkError,
)
from ipsec.netlink import NetlinkDecodeError
from ipsec.xfrm import structs as s
from ipsec.xfrm.kernel import XfrmKernel
from ipsec.xfrm.netlink import XfrmError, XfrmSocket
from ipsec.xfrm.objects import (
    Direction,
    IPAddress,
    Lifetime,
    Mode,
    PolicyId,
    PolicySpec,
    SaId,
    SaSpec,
    SaState,
    Selector,
    Template,
)

log = logging.getLogger(__name__)

#: The kernel deletes an SA this long after the link's hard lifetime would have the core
#: block it: the core's orderly block comes first, and a dead daemon's key still ends.
BACKSTOP_SLACK = 5.0
#: Reqids per link: the inbound one, then a pool for outbound SAs (one per live epoch).
REQIDS_PER_LINK = 256
#: At most one rekey request per this many seconds for missing SAs (ACQUIRE comes per
#: packet burst, not once).
ACQUIRE_HOLDOFF = 5.0
#: Default soft packet limit: half the 32-bit ESP sequence space, so a rekey comes long
#: before the counter would run out (the kernel then drops; extended sequence numbers
#: would need both ends configured alike).
SOFT_PACKETS = 2**31


def _subnet(value: Any) -> Any:
    """A network with a clear error for the common slip of writing an address in it."""
    if isinstance(value, str):
        try:
            return ip_network(value)
        except ValueError as e:
            try:
                loose = ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not an IPv4 or IPv6 network ({e})") from None
            raise ValueError(f"{value!r} has host bits set: did you mean {loose}?") from None
    return value


Subnet = Annotated[IPv4Network | IPv6Network, BeforeValidator(_subnet)]


class SoftLimits(ConfigModel):
    """Reaching one makes the link rekey now (the kernel reports it per SA)."""

    bytes: int | None = Field(default=None, gt=0, lt=s.XFRM_INF)
    packets: int | None = Field(default=SOFT_PACKETS, gt=0, lt=s.XFRM_INF)
    seconds: int | None = Field(default=None, gt=0, le=MAX_SECONDS)


class HardLimits(ConfigModel):
    """Reaching one makes the kernel delete the SA: traffic stops until the next epoch."""

    bytes: int | None = Field(default=None, gt=0, lt=s.XFRM_INF)
    packets: int | None = Field(default=None, gt=0, lt=s.XFRM_INF)


class XfrmSinkConfig(SinkConfig):
    type: Literal["xfrm"]
    mode: Literal["tunnel", "transport"] = "tunnel"
    local: IPvAnyAddress = Field(description="this gateway's ESP endpoint address")
    remote: IPvAnyAddress = Field(description="the peer gateway's ESP endpoint address")
    local_subnets: list[Subnet] = Field(
        default_factory=list, description="tunnel mode: the networks behind this gateway")
    remote_subnets: list[Subnet] = Field(
        default_factory=list, description="tunnel mode: the networks behind the peer")
    replay_window: int = Field(default=64, ge=0, le=4096,
                               description="anti-replay window, packets (RFC 4303: 64)")
    priority: int = Field(default=1000, ge=2, le=2**31,
                          description="policy priority (lower wins)")
    reqid: int | None = Field(default=None, ge=1, le=2**32 - REQIDS_PER_LINK,
                              description=f"first of the link's {REQIDS_PER_LINK} reqids"
                                          " (default: derived from the link name)")
    soft_limits: SoftLimits = SoftLimits()
    hard_limits: HardLimits = HardLimits()
    on_stop: Literal["block", "remove"] = Field(
        default="block", description="block: leave policies that drop the traffic;"
                                     " remove: delete everything this sink installed")

    @model_validator(mode="after")
    def _consistent(self) -> XfrmSinkConfig:
        if self.local.version != self.remote.version:
            raise ValueError("local and remote must both be IPv4 or both IPv6")
        if self.local == self.remote:
            raise ValueError("local and remote are the same address")
        if self.mode == "transport":
            if self.local_subnets or self.remote_subnets:
                raise ValueError("transport mode protects the traffic between local and"
                                 " remote themselves: leave out local_subnets and"
                                 " remote_subnets")
        else:
            if not self.local_subnets or not self.remote_subnets:
                raise ValueError("tunnel mode needs local_subnets and remote_subnets")
            if not self.selectors():
                raise ValueError("no local and remote subnet of the same IP version")
        return self

    def selectors(self) -> list[Selector]:
        """Outbound selectors: every local subnet to every remote one of its IP version."""
        if self.mode == "transport":
            return [Selector(ip_network(self.local), ip_network(self.remote))]
        return [Selector(a, b) for a, b in itertools.product(self.local_subnets,
                                                              self.remote_subnets)
                if a.version == b.version]

    def reqid_base(self, link: str) -> int:
        """The link's reqids start here: configured, or from a hash of the link name."""
        if self.reqid is not None:
            return self.reqid
        return 0x5100_0000 + (zlib.crc32(link.encode()) & 0xFFFF) * REQIDS_PER_LINK

    def build(self, context: SinkContext) -> XfrmSink:
        return XfrmSink(self, context)

    @classmethod
    def check_together(cls, sinks: Sequence[tuple[str, Self]]) -> None:
        """Each link's sink uses REQIDS_PER_LINK reqids from its base: no two may overlap."""
        bases = sorted((sink.reqid_base(link), link) for link, sink in sinks)
        for (a, link_a), (b, link_b) in itertools.pairwise(bases):
            if b - a < REQIDS_PER_LINK:
                raise ValueError(f"xfrm sinks of links {link_a} and {link_b}: reqid ranges"
                                 f" overlap ({a} and {b}; each needs {REQIDS_PER_LINK}): set"
                                 " `reqid` on one of them")


class XfrmSink:
    def __init__(self, config: XfrmSinkConfig, context: SinkContext) -> None:
        self.config, self.context = config, context
        self.name = f"xfrm:{config.local}<->{config.remote}"
        self.local: IPAddress = config.local
        self.remote: IPAddress = config.remote
        self.mode = Mode.TUNNEL if config.mode == "tunnel" else Mode.TRANSPORT
        base = config.reqid_base(context.link)
        self.in_reqid = base
        self.out_reqids = range(base + 1, base + REQIDS_PER_LINK)
        self.outbound: dict[int, int] = {}  # SPI -> reqid of our live outbound SAs
        self.inbound: set[int] = set()  # SPIs of our live inbound SAs
        self.current: int | None = None  # SPI the out policies point to; None: blocked
        self.kernel: XfrmKernel | None = None
        self._listener: asyncio.Task[None] | None = None
        self._last_acquire = 0.0
        lifetimes = context.lifetimes
        soft, hard = config.soft_limits, config.hard_limits
        limits = {"soft_bytes": soft.bytes, "soft_packets": soft.packets,
                  "soft_seconds": soft.seconds, "hard_bytes": hard.bytes,
                  "hard_packets": hard.packets}
        self.out_lifetime = Lifetime(
            **limits, hard_seconds=math.ceil(lifetimes.hard_lifetime + BACKSTOP_SLACK))
        # An inbound SA is installed up to an attempt's length before the peer sends on it.
        self.in_lifetime = Lifetime(**limits, hard_seconds=math.ceil(
            lifetimes.hard_lifetime + lifetimes.attempt_timeout + BACKSTOP_SLACK))

    # -- policies ------------------------------------------------------------------------

    def _policies(self, out_reqid: int | None) -> list[PolicySpec]:
        """All policies of the link; `out` ones protect with OUT_REQID, or block (None)."""
        prio = self.config.priority
        out: list[PolicySpec] = []
        for sel in self.config.selectors():
            out.append(PolicySpec(
                sel, Direction.OUT, prio, block=out_reqid is None,
                template=None if out_reqid is None
                else Template(self.local, self.remote, out_reqid, self.mode)))
            inbound = Template(self.remote, self.local, self.in_reqid, self.mode)
            out.append(PolicySpec(sel.reversed(), Direction.IN, prio, inbound))
            if self.mode is Mode.TUNNEL:
                out.append(PolicySpec(sel.reversed(), Direction.FWD, prio, inbound))
        return self._bypasses() + out

    def _bypasses(self) -> list[PolicySpec]:
        """Let the peer channel through when the policies would cover it (always in
        transport mode): rekeys must work while traffic is blocked."""
        host = 32 if self.local.version == 4 else 128
        endpoints = Selector(ip_network((self.local, host)), ip_network((self.remote, host)))
        if not any(sel.covers(endpoints) for sel in self.config.selectors()):
            return []
        prio = self.config.priority - 1
        ours, theirs = self.context.control_listen.port, self.context.control_peer.port
        out = []
        for port_match in ({"dport": theirs}, {"sport": ours}):
            sel = endpoints.with_ports(proto=6, **port_match)
            out += [PolicySpec(sel, Direction.OUT, prio),
                    PolicySpec(sel.reversed(), Direction.IN, prio)]
        return out

    async def _set_out(self, reqid: int | None) -> None:
        kernel = self._kernel()
        for p in self._policies(reqid):
            if p.direction is Direction.OUT and p.priority == self.config.priority:
                await kernel.set_policy(p)

    # -- the Sink protocol -----------------------------------------------------------------

    async def start(self) -> None:
        groups = (1 << (s.XFRMNLGRP_EXPIRE - 1)) | (1 << (s.XFRMNLGRP_ACQUIRE - 1))
        try:
            # Both sockets opened here, not in a task: a socket belongs to the network
            # namespace it was made in.
            self.kernel = XfrmKernel()
            notifications = XfrmSocket(groups)
        except XfrmError as e:
            if self.kernel is not None:
                self.kernel.close()
                self.kernel = None
            raise SinkError(f"cannot use XFRM: {e}") from None
        try:
            await self._adopt()
            for p in self._policies(self.outbound.get(self.current or -1)):
                await self.kernel.set_policy(p)
        except XfrmError as e:
            notifications.close()
            raise SinkError(f"cannot set up XFRM: {e}") from None
        self._listener = asyncio.create_task(self._listen(notifications),
                                             name=f"xfrm-{self.context.link}")
        log.info("link %s: xfrm %s mode %s <-> %s, %d selector(s), %s", self.context.link,
                 self.config.mode, self.local, self.remote, len(self.config.selectors()),
                 "traffic on the adopted SA" if self.current else "traffic blocked")

    async def _adopt(self) -> None:
        """Take over SAs a previous run of this link left (after a crash: the kernel kept
        forwarding on them). The core retires those it knows; the others expire."""
        kernel = self._kernel()
        sas = await kernel.sas()
        for sa in sas:
            if sa.src == self.local and sa.dst == self.remote and sa.reqid in self.out_reqids:
                self.outbound[sa.spi] = sa.reqid
            elif sa.src == self.remote and sa.dst == self.local and sa.reqid == self.in_reqid:
                self.inbound.add(sa.spi)
        first = self.config.selectors()[0]
        for p in await kernel.policies():
            if (p.direction == Direction.OUT and p.selector == first and not p.block
                    and p.reqid in self.outbound.values()):
                self.current = next(spi for spi, r in self.outbound.items() if r == p.reqid)
        if self.outbound or self.inbound:
            log.info("link %s: adopted %d outbound and %d inbound SA(s) left in the kernel",
                     self.context.link, len(self.outbound), len(self.inbound))

    async def install_inbound(self, material: EpochMaterial) -> None:
        sa = SaSpec(self.remote, self.local, material.spi_in, self.in_reqid, self.mode,
                    material.inbound_esp, self.config.replay_window, self.in_lifetime)
        try:
            await self._kernel().add_sa(sa)
        except XfrmError as e:
            raise SinkError(str(e)) from None
        self.inbound.add(sa.spi)

    async def activate_outbound(self, material: EpochMaterial) -> None:
        kernel = self._kernel()
        reqid = self._free_reqid()
        sa = SaSpec(self.local, self.remote, material.spi_out, reqid, self.mode,
                    material.outbound_esp, self.config.replay_window, self.out_lifetime)
        try:
            await kernel.add_sa(sa)
        except XfrmError as e:
            raise SinkError(str(e)) from None
        self.outbound[sa.spi] = reqid
        previous = self.current
        try:
            await self._set_out(reqid)
        except XfrmError as e:
            # Leave no half-switched state: back to what was, then forget the new SA.
            with contextlib.suppress(XfrmError):
                await self._set_out(self.outbound.get(previous or -1))
            with contextlib.suppress(XfrmError):
                await kernel.delete_sa(SaId(self.remote, sa.spi))
            self.outbound.pop(sa.spi, None)
            raise SinkError(str(e)) from None
        self.current = sa.spi

    async def retire_inbound(self, ref: EpochRef) -> None:
        await self._delete(SaId(self.local, ref.spi_in))
        self.inbound.discard(ref.spi_in)

    async def retire_outbound(self, ref: EpochRef) -> None:
        if ref.spi_out == self.current:  # only after block(): never delete what sends
            await self.block(ref.link, f"epoch {ref.epoch} retired")
        await self._delete(SaId(self.remote, ref.spi_out))
        self.outbound.pop(ref.spi_out, None)

    async def block(self, link: str, reason: str) -> None:
        try:
            await self._set_out(None)
        except XfrmError as e:
            raise SinkError(str(e)) from None
        self.current = None

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self.kernel is None:
            return
        try:
            if self.config.on_stop == "block":
                await self._set_out(None)
            else:
                for p in self._policies(None):
                    await self.kernel.delete_policy(PolicyId(p.selector, p.direction))
            for spi in list(self.outbound):
                await self._delete(SaId(self.remote, spi))
            for spi in list(self.inbound):
                await self._delete(SaId(self.local, spi))
        except (XfrmError, SinkError) as e:
            log.error("link %s: xfrm cleanup incomplete: %s", self.context.link, e)
        finally:
            self.kernel.close()
            self.kernel = None
        log.info("link %s: xfrm SAs removed, policies %s", self.context.link,
                 "left blocking" if self.config.on_stop == "block" else "removed")

    async def remove(self) -> None:
        """As on stop: the SAs go, the policies block or go as on_stop says; no file."""
        await self.close()

    # -- helpers -------------------------------------------------------------------------

    def _kernel(self) -> XfrmKernel:
        if self.kernel is None:
            raise SinkError("the xfrm sink is not started")
        return self.kernel

    def _free_reqid(self) -> int:
        used = set(self.outbound.values())
        for reqid in self.out_reqids:
            if reqid not in used:
                return reqid
        raise SinkError(f"all {len(self.out_reqids)} outbound reqids are in use")

    async def _delete(self, sa: SaId) -> None:
        try:
            await self._kernel().delete_sa(sa)
        except XfrmError as e:
            raise SinkError(str(e)) from None

    # -- kernel notifications ----------------------------------------------------------------

    async def _listen(self, sock: XfrmSocket) -> None:
        """Soft and hard expiry of our SAs, and ACQUIREs for our policies."""
        try:
            async for msg in sock.notifications():
                try:
                    if msg["header"]["type"] == s.XFRM_MSG_EXPIRE:
                        self._expired(SaState.from_message(msg), hard=bool(msg["hard"]),
                                      msg=msg)
                    else:
                        self._acquired(Selector.from_fields(msg))
                except NetlinkDecodeError as e:  # one notification lost, not the listener
                    log.error("link %s: xfrm notification skipped: %s", self.context.link, e)
        except OSError as e:
            log.error("link %s: xfrm notifications lost: %s", self.context.link, e)
        finally:
            sock.close()

    def _expired(self, sa: SaState, *, hard: bool, msg: object) -> None:
        if sa.dst == self.remote and sa.spi in self.outbound:
            direction = "outbound"
        elif sa.dst == self.local and sa.spi in self.inbound:
            direction = "inbound"
        else:
            return
        link = self.context.link
        if hard:
            log.warning("link %s: the kernel deleted %s SA %#010x at a hard limit",
                        link, direction, sa.spi)
            self.outbound.pop(sa.spi, None) if direction == "outbound" \
                else self.inbound.discard(sa.spi)
            if sa.spi == self.current:
                self.current = None  # the out policies now drop (no SA for their reqid)
        limit = _limit_reached(msg, hard)
        self.context.events.rekey_needed(
            link, RekeyCause.HARD_LIMIT if hard else RekeyCause.SOFT_LIMIT,
            f"{direction} SA {sa.spi:#010x} reached its {'hard' if hard else 'soft'} {limit}"
            " limit")

    def _acquired(self, selector: Selector) -> None:
        if not any(sel.covers(selector) for sel in self.config.selectors()):
            return
        now = time.monotonic()
        if now - self._last_acquire < ACQUIRE_HOLDOFF:
            return
        self._last_acquire = now
        self.context.events.rekey_needed(
            self.context.link, RekeyCause.NO_SA,
            f"no SA for outbound traffic {selector}: dropped, rekeying")


def _limit_reached(msg: object, hard: bool) -> str:
    """Which limit an XFRM_MSG_EXPIRE is about: bytes, packets or time."""
    m: dict[str, int] = msg  # type: ignore[assignment]
    kind = "hard" if hard else "soft"
    for what, used in (("byte", "curlft_bytes"), ("packet", "curlft_packets")):
        limit = m[f"lft_{kind}_{what}_limit"]
        if limit != s.XFRM_INF and m[used] >= limit:
            return what
    return "time"

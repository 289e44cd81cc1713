"""`qkdgw run`: the daemon that drives one rekey core per link.

All I/O lives here: the KMS (status polls, enc_keys/dec_keys), the peer channel, the sinks,
the state files, the audit trail, the metrics and admin endpoints. Each link has one task
that feeds its core events and carries out the actions it returns, in order. Sink calls are
awaited in order, and their outcome goes back to the core as an event (installed or not,
switched or not; a retirement or a block that failed): the core decides what a failure means
(docs/protocol.md). KMS fetches and sends run concurrently and come back as events too.

A graceful stop (SIGTERM, Ctrl-C) leaves each data plane as its sink's stop behaviour says
and keeps the state files; the next start resumes from them.

A reload (`qkdgw reload`, SIGHUP) reads the configuration file again and applies the
difference (gateway/reload.py decides it): links added start, links removed stop and are
cleaned up, a changed policy goes to the link's core through its own queue, changed sinks
take over at the link's next epoch; links that did not change are not touched at all.

Failing closed does not rest on the happy path:
- each link runs under a supervisor: an exception nobody foresaw blocks the link's traffic,
  raises the `link-failed` alarm, writes an audit record and restarts the link from its saved
  state, with backoff; a task a link spawned (a send, a KMS fetch) that fails unexpectedly
  fails its link the same way;
- a watchdog blocks a link whose key is past its hard lifetime when the link's own task has
  not (it is stuck, say in a sink), and restarts it; `run()` adds a thread that ends the
  process if the event loop itself stops turning, leaving the data planes to their own
  lifetimes and the service manager to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import fcntl
import hashlib
import logging
import math
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, assert_never

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from common.config import ConfigError, HostPort, read_config_bytes
from common.files import write_private
from common.sink import (
    ProvidedKey,
    RekeyCause,
    Role,
    Sink,
    SinkConfig,
    SinkContext,
    SinkError,
)
from common.text import quote_remote
from common.tlsctx import server_context
from gateway.audit import AuditError, AuditLog, Head, Signer, TrailEvent
from gateway.config import LinkConfig, MetricsTlsConfig, SiteConfig
from gateway.core.events import (
    AckReceived,
    Action,
    ActivateFailed,
    ActivateOutbound,
    Alarm,
    Block,
    BlockFailed,
    Cause,
    ClearAlarm,
    CommitReceived,
    Event,
    FetchQkdKeys,
    FetchQkdKeysById,
    InstallFailed,
    InstallInbound,
    KmsStatusObserved,
    KmsUnreachable,
    LinkUnknownAtPeer,
    PeerMessage,
    Persist,
    QkdFetchFailed,
    QkdKeysFetched,
    RaiseAlarm,
    Record,
    RecordKind,
    RekeyRequested,
    RequestStart,
    RetireFailed,
    RetireInbound,
    RetireOutbound,
    Send,
    SinkActivated,
    SinkInstalled,
    StartGranted,
    Tick,
    received,
)
from gateway.core.machine import (
    CoreError,
    IllegalEvent,
    LinkIdentity,
    LinkMachine,
    PeerMessageRejected,
    State,
)
from gateway.core.messages import Ack, AuditHead, Commit, Message
from gateway.core.policy import Policy
from gateway.core.snapshot import Snapshot
from gateway.ha import (
    HANDOVER_SETTLE,
    NodeRole,
    Notification,
    NotifyFifo,
    ha_dir,
    handover_file,
    role_at_start,
    write_handover,
)
from gateway.history import (
    SAVE_PERIOD,
    Condition,
    History,
    LinkHistoryView,
    alarm_bits,
    view,
)
from gateway.history import Snapshot as HistorySnapshot
from gateway.keyrequests import KeyRequests
from gateway.metrics import Metrics
from gateway.pacing import GATHER_LIMIT, Pacer
from gateway.peer import PeerChannel, PeerChannels, PeerServer, certificate_sha256
from gateway.reload import LinkChange, NotLive, Plan, plan, tls_files
from gateway.statefiles import StateFiles
from gateway.status import (
    AuditStatus,
    Handover,
    HaStatus,
    KmsStatus,
    LastRekey,
    LinkStatus,
    PacingStatus,
    PeerChannelStatus,
    Rekeying,
    Reloaded,
    SiteStatus,
    Stopping,
    Summary,
    SupplyStatus,
)
from gateway.web.dashboard import Changes, Dashboard, security_headers
from kms.errors import KmsError
from kms.models import SourceStatus

log = logging.getLogger("gateway")

#: A sink call that takes longer is a failed sink: the core then abandons the exchange (or
#: keeps traffic blocked) instead of waiting forever.
SINK_TIMEOUT = 30.0

#: A stop first waits this long for data planes in the middle of switching keys to finish
#: (a key file's fsync, a netlink update, a VICI load: milliseconds, seconds on a loaded
#: disk). Stopped mid-switch, a link restarts blocked, as it must when it cannot know which
#: key its data plane sends on; a switch still going after this is stuck, and left to that.
STOP_SWITCH_WAIT = 5.0
#: How often that wait looks.
STOP_SWITCH_POLL = 0.02

#: Link state is written at most this often (and on stop). A crash loses at most this much;
#: that is safe: a stale state file resynchronises like a lost one (stale-epoch abort).
STATE_FLUSH_INTERVAL = 1.0

#: A failed link is restarted after this, doubling up to RESTART_BACKOFF_MAX while it keeps
#: failing: a bug that fires at once must not spin, one that fires rarely must not linger.
RESTART_BACKOFF = 1.0
RESTART_BACKOFF_MAX = 60.0
#: The watchdog looks at every link this often ...
WATCHDOG_PERIOD = 0.5
#: ... and acts when a key is this far past its hard lifetime without the link's own task
#: having blocked it (the task does so at the deadline, within milliseconds, when healthy).
WATCHDOG_SLACK = 1.0
#: An event loop that has not run the watchdog for this long is stuck (a handler spinning,
#: a blocking call): `run()` ends the process, so the data planes' own lifetimes take over
#: and the service manager restarts it. Far above any pause a healthy daemon makes.
LOOP_STALL_LIMIT = 10.0
#: Exit status after a stalled event loop (EX_SOFTWARE).
EXIT_STALLED = 70

#: Peer messages waiting in one link's queue at most; more are refused for that link alone
#: (the channel reads on). An honest peer has one or two in flight per link.
MAX_PEER_BACKLOG = 32

#: How often the start looks whether every link has asked for its first turn: every
#: GATHER_POLL_FINE for the first GATHER_FINE, then every GATHER_POLL.
GATHER_POLL = 0.01
GATHER_POLL_FINE = 0.001
GATHER_FINE = 0.1

#: An unknown link's error names this many of the site's links (a hub has thousands).
LINKS_NAMED = 10

#: How often each link's condition is noted in its history: a PQC-only or blocked span shows
#: within this of its start (the KMS poll that caused it comes first).
HISTORY_PERIOD = 1.0

#: How often a handover looks whether keepalived has made this node standby yet.
HANDOVER_POLL = 0.005

#: Record kinds that go to the audit trail (key handling); all are logged.
K = RecordKind
AUDITED = {K.FETCHED, K.OFFERED, K.DERIVED, K.INSTALLED, K.ACTIVATED, K.REKEYED, K.RETIRED,
           K.DISCARDED, K.REJECTED, K.UNCONFIRMED}
#: ... and those logged at INFO (the rest at DEBUG: one line per epoch is enough for people).
LOGGED = {K.REKEYED, K.DISCARDED, K.REJECTED, K.UNCONFIRMED, K.REKEY_DEFERRED}


def condition(m: LinkMachine) -> Condition:
    """What protects the link's traffic now."""
    if m.blocked:
        return Condition.BLOCKED
    if m.outbound is None:
        return Condition.NONE
    return Condition.QKD if m.outbound.suite.qkd else Condition.PQC


class LinkFailure(Exception):
    """A link's task cannot go on; the supervisor blocks the link and restarts it."""


@dataclass(frozen=True)
class _TaskFailed(Event):
    """A task the link spawned ended with an exception nobody foresaw."""

    what: str
    error: BaseException


@dataclass(frozen=True)
class _PolicyChanged(Event):
    """A reload changed the link's policy: its own task hands it to the core, between two
    events (never in the middle of carrying out the actions of one)."""

    policy: Policy


@dataclass(frozen=True)
class SinkSwap:
    """The sinks a reload gives a link, put in place at its next epoch (before that epoch's
    inbound key is installed): the current key stays where it is until then."""

    configs: list[SinkConfig]
    #: In configuration order: the sinks kept (the running objects) and the new ones.
    sinks: list[Sink]
    context: SinkContext
    #: The running sinks that go, each with whether its configuration is gone (`remove`:
    #: its key files go too) or only rebuilt with new lifetimes or peer address (`close`).
    leaving: list[tuple[Sink, bool]]


@dataclass
class LinkRunner:
    daemon: Daemon
    config: LinkConfig[Any]
    machine: LinkMachine
    sinks: list[Sink]
    peer: PeerChannel
    #: What the running sinks were built from (a reload compares the new configuration).
    sink_configs: list[SinkConfig]
    sink_context: SinkContext
    #: Sinks not started yet (a link added by a reload, or sinks a reload replaced): started
    #: before the link's first action, or before the next epoch's install.
    unstarted: list[Sink] = field(default_factory=list)
    #: A reload's new sinks, waiting for the next epoch.
    swap: SinkSwap | None = None
    #: A reload removed the link: what still holds this runner leaves it alone.
    removed: bool = False
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    peer_backlog: int = 0  # peer messages in the queue (bounded: MAX_PEER_BACKLOG)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    last_latency: float | None = None
    last_rekey: LastRekey | None = None
    kms_seen: KmsStatus = field(default_factory=lambda: KmsStatus(ok=True, reason=""))
    #: When the key the sinks send on reaches its hard lifetime; None while blocked. The
    #: watchdog holds the link to it even when this task is stuck.
    active_until: float | None = None
    #: The task running `run()`; the watchdog cancels it when the link is stuck.
    task: asyncio.Task[None] | None = None
    stuck: str = ""  # why the watchdog cancelled the task
    #: The last Commit or Ack received: its audit head is anchored once its epoch is done.
    completing: Commit | Ack | None = None
    #: The link holds a turn of the daemon's exchange pacer (until it is idle again).
    turn: bool = False
    #: The link has asked the pacer for a turn (the start's gathering waits for every one).
    asked: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    async def run(self, *, plane_blocked: bool = False) -> None:
        m = self.machine
        if failed := await self._start_sinks():
            raise LinkFailure(f"cannot start a sink: {failed}")
        if m.outbound is not None and not plane_blocked:  # adopted after a restart
            self.active_until = m.outbound.activated_at + m.policy.hard_lifetime
        await self.execute(m.start(time.time(), plane_blocked=plane_blocked))
        while not self.daemon.stopping:
            event = await self._next_event()
            if isinstance(event, _TaskFailed):
                raise LinkFailure(f"{event.what} failed") from event.error
            if isinstance(event, _PolicyChanged):
                await self.execute(m.reconfigure(event.policy, time.time()))
                if self.active_until is not None and m.outbound is not None:
                    self.active_until = m.outbound.activated_at + m.policy.hard_lifetime
                continue
            try:
                actions = m.handle(event, time.time())
            except PeerMessageRejected as e:
                self.daemon.rejected(self.name, e.reason, str(e))
                continue
            except IllegalEvent as e:
                log.error("link %s: %s (ignored)", self.name, e)
                continue
            await self.execute(actions)
            if self.turn and m.state is State.IDLE and m.queued is None:
                self.give_turn_back()
            if isinstance(event, CommitReceived | AckReceived):
                self.completing = event.message
            done = next((a.epoch for a in actions
                         if isinstance(a, Record) and a.kind is K.REKEYED), None)
            # The epoch is done (for the responder, once its data plane switched): anchor
            # the peer's audit head its Commit or Ack carried.
            if done is not None and self.completing is not None \
                    and self.completing.epoch == done:
                self.daemon.peer_head(self, self.completing)
                self.completing = None

    async def _next_event(self) -> Event:
        """The next queued event (events first: they may change what is due), else a Tick
        at the core's next deadline."""
        if not self.queue.empty():
            await asyncio.sleep(0)  # let the other links have a turn
            return self._taken(self.queue.get_nowait())
        deadline = self.machine.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        # asyncio.timeout, not wait_for: under load, 3.11's wait_for can swallow a
        # cancellation when the queue read completes at the same moment (CPython gh-86296),
        # and the daemon would never stop.
        try:
            async with asyncio.timeout(timeout):
                return self._taken(await self.queue.get())
        except TimeoutError:
            return Tick()

    def _taken(self, event: Event) -> Event:
        if isinstance(event, PeerMessage):
            self.peer_backlog -= 1
        return event

    def spawn(self, what: str, coroutine: Any) -> None:
        """Run COROUTINE beside the link; if it fails unexpectedly, the link fails."""
        task = asyncio.create_task(coroutine, name=f"link-{self.name}-{what}")
        self.tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.tasks.discard(t)
            error = None if t.cancelled() else t.exception()
            if error is not None:
                self.queue.put_nowait(_TaskFailed(what, error))

        task.add_done_callback(done)

    def cancel_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    async def _await_turn(self, deadline: float) -> None:
        """The core asked to start an exchange: wait for a turn (unless it still holds the
        last one), then let it."""
        self.asked = True  # (in the same step as the pacer takes the request)
        if not self.turn:
            await self.daemon.exchanges.acquire(self.config.peer.name, deadline)
            self.turn = True
        self.queue.put_nowait(StartGranted())

    def give_turn_back(self) -> None:
        if self.turn:
            self.turn = False
            self.daemon.exchanges.release(self.config.peer.name)

    @property
    def deadline(self) -> float:
        """When the link's key reaches its hard lifetime (now, without one): the pacers
        serve the earliest first."""
        return time.time() if self.active_until is None else self.active_until

    async def execute(self, actions: list[Action]) -> None:
        for a in actions:
            match a:
                case Send():
                    self.spawn("send", self.peer.send(self.name, self.daemon.stamp(a.message)))
                case FetchQkdKeys():
                    self.spawn("enc_keys", self._fetch(a))
                case FetchQkdKeysById():
                    self.spawn("dec_keys", self._fetch_by_id(a))
                case InstallInbound():
                    e = a.material.epoch
                    failed = await self._sinks_in_place(e)
                    failed = failed or await self._each_sink(
                        f"epoch {e}: install inbound",
                        lambda s, m=a.material: s.install_inbound(m), first=True)
                    await self.queue.put(InstallFailed(e, failed) if failed
                                         else SinkInstalled(e))
                case ActivateOutbound():
                    o = self.machine.outbound
                    self.active_until = (o.activated_at if o else time.time()) + \
                        self.machine.policy.hard_lifetime
                    e = a.material.epoch
                    # The status shows this epoch from now on (state `activating` until the
                    # switch is done): with its key's fingerprint, not none.
                    self.daemon.note_fingerprint(self.name, e, a.material.fingerprint)
                    failed = await self._each_sink(
                        f"epoch {e}: activate outbound",
                        lambda s, m=a.material: s.activate_outbound(m), first=True)
                    await self.queue.put(ActivateFailed(e, failed) if failed
                                         else SinkActivated(e))
                case RetireInbound() | RetireOutbound():
                    out = isinstance(a, RetireOutbound)
                    if failed := await self._each_sink(
                            f"retire {'out' if out else 'in'}bound",
                            lambda s, r=a.ref, o=out: s.retire_outbound(r) if o
                            else s.retire_inbound(r)):
                        await self.queue.put(RetireFailed(a.ref, out, failed))
                case Block():
                    log.warning("link %s: traffic blocked: %s", self.name, a.reason)
                    self.active_until = None
                    if failed := await self._each_sink(
                            "block", lambda s, why=a.reason: s.block(self.name, why)):
                        await self.queue.put(BlockFailed(failed))
                case RaiseAlarm() | ClearAlarm():
                    self.daemon.alarm(self.name, a)
                case Record():
                    self.daemon.record(self, a)
                case Persist():
                    self.daemon.dirty.add(self.name)
                case RequestStart():
                    self.spawn("turn", self._await_turn(a.deadline))
                case _:
                    assert_never(a)

    async def _each_sink(self, what: str, call: Any, *, first: bool = False) -> str:
        """CALL on every started sink (up to the FIRST failure if asked); what failed, or
        "". A sink not started holds no key: nothing to install, switch, retire or block."""
        failed = []
        for sink in [s for s in self.sinks if s not in self.unstarted]:
            try:
                async with asyncio.timeout(SINK_TIMEOUT):
                    await call(sink)
            except (SinkError, TimeoutError, OSError) as e:
                reason = f"{sink.name}: {e or type(e).__name__}"
                log.error("link %s: %s failed: %s", self.name, what, reason)
                self.daemon.metrics.failures.labels(self.name, Cause.SINK.value).inc()
                failed.append(reason)
                if first:
                    break
        return "; ".join(failed)

    async def _sinks_in_place(self, epoch: int) -> str:
        """Before an epoch's install: a reload's new sinks take over (the ones that go stop,
        or are removed), and every sink not started yet starts. What failed, or ""."""
        swap, self.swap = self.swap, None
        if swap is not None:
            for sink, gone in swap.leaving:
                if sink in self.unstarted:
                    continue  # never started: nothing to stop
                try:
                    async with asyncio.timeout(SINK_TIMEOUT):
                        await (sink.remove() if gone else sink.close())
                except Exception as e:  # the others must still be swapped
                    log.error("link %s: %s %s failed: %s", self.name,
                              "removing" if gone else "closing", sink.name, _describe(e))
            running = [s for s in self.sinks if s not in self.unstarted]
            self.unstarted = [s for s in swap.sinks if s not in running]
            self.sinks, self.sink_configs, self.sink_context = \
                swap.sinks, swap.configs, swap.context
            log.info("link %s: epoch %d goes to the reloaded sinks: %s", self.name, epoch,
                     ", ".join(s.name for s in self.sinks) or "none")
        return await self._start_sinks()

    async def _start_sinks(self) -> str:
        """Start the sinks not started yet, in order, up to the first failure (it is tried
        again next time). What failed, or ""."""
        for sink in list(self.unstarted):
            try:
                async with asyncio.timeout(SINK_TIMEOUT):
                    await sink.start()
            except (SinkError, TimeoutError, OSError) as e:
                reason = f"{sink.name}: {e or type(e).__name__}"
                log.error("link %s: starting a sink failed: %s", self.name, reason)
                self.daemon.metrics.failures.labels(self.name, Cause.SINK.value).inc()
                return reason
            self.unstarted.remove(sink)
        return ""

    async def _fetch(self, a: FetchQkdKeys) -> None:
        try:
            keys = await self.daemon.key_requests.enc_keys(self.config.peer.sae_id, a.number,
                                                           a.size, self.deadline)
        except KmsError as e:
            await self.queue.put(QkdFetchFailed(a.request, str(e)))
        else:
            await self.queue.put(QkdKeysFetched(a.request, keys))

    async def _fetch_by_id(self, a: FetchQkdKeysById) -> None:
        try:
            keys = await self.daemon.key_requests.dec_keys(self.config.peer.sae_id,
                                                           a.key_ids, a.size, self.deadline)
        except (KmsError, ValueError) as e:
            await self.queue.put(QkdFetchFailed(a.request, str(e)))
        else:
            await self.queue.put(QkdKeysFetched(a.request, keys))

    def status(self, now: float) -> LinkStatus:
        m = self.machine
        o = m.outbound
        alarms = {k.value: v for k, v in m.alarms.items()}
        if self.name in self.daemon.failed:
            alarms[Alarm.LINK_FAILED.value] = self.daemon.failed[self.name]
        return LinkStatus(
            link=self.name, role=m.role.value, peer=self.config.peer.name,
            mode=m.policy.mode.value, state=m.state.value, epoch=m.current_epoch,
            blocked=m.blocked, suite=o.suite.name if o else None,
            condition=condition(m).name.lower(),
            key_age=None if o is None else round(now - o.activated_at, 3),
            fingerprint=self.daemon.fingerprints.get(self.name, {}).get(m.current_epoch),
            interval=m.policy.interval, hard_lifetime=m.policy.hard_lifetime,
            qber_threshold=m.policy.qber_threshold,
            data_planes=[s.name for s in self.sinks],
            rekeys=m.rekeys, last_rekey_latency=self.last_latency, last_rekey=self.last_rekey,
            next_rekey_in=None if m.next_rekey_at is None
            else round(max(0.0, m.next_rekey_at - now), 3),
            queued=m.queued is not None and not self.turn,
            alarms=alarms,
            kms=self.kms_seen.model_copy(update={"ok": m.kms.ok, "reason": m.kms.reason}),
            peer_channel_connects=self.peer.connects + self.daemon.accepted.get(
                self.config.peer.name, 0),
            supply=SupplyStatus(**_rounded(asdict(m.supply(now)))))


#: Reads and checks a site configuration file as `qkdgw check-config` does, from its bytes
#: already read: the composition root's (gateway.site.check), which knows every sink type.
Check = Callable[[Path, bytes], SiteConfig[Any]]


@dataclass(frozen=True)
class ConfigFile:
    """The file a daemon runs from, and how to read it again (`qkdgw reload`, SIGHUP)."""

    path: Path
    check: Check

    def read(self) -> tuple[SiteConfig[Any], str]:
        """The configuration as checked, and the SHA-256 of the bytes it was read from."""
        raw = read_config_bytes(self.path)
        return self.check(self.path, raw), hashlib.sha256(raw).hexdigest()


class HandoverRefused(Exception):
    """A handover that cannot be done (or did not happen); the message says why."""


class ReloadRefused(Exception):
    """A reload that changed nothing; the message says why (as `qkdgw check-config` would,
    for a file that does not pass it)."""


class Daemon:
    def __init__(self, config: SiteConfig[Any], *, debug: bool = False,
                 source: ConfigFile | None = None, config_sha256: str = "") -> None:
        """DEBUG (`qkdgw -v run`): each link's core also holds every move to its row of the
        transition table (a mismatch fails the link, and says where). SOURCE: the file
        CONFIG was read from (whose bytes hash to CONFIG_SHA256), read again on a reload;
        without it a reload is refused."""
        self.config = config
        self.debug = debug
        self.source = source
        self.config_sha256 = config_sha256
        self.metrics = Metrics()
        self.fingerprints: dict[str, dict[int, str]] = {}
        self.runners: dict[str, LinkRunner] = {}
        #: What the dashboard plots and the report sums up (gateway/history.py).
        self.history = History()
        #: Bumped on every change the dashboard shows (its live updates wait for it).
        self.changes = Changes()
        self.kme = config.kms.client()
        pacing = config.pacing
        #: Turns for the exchanges this daemon starts, per peer gateway (docs/operations.md);
        #: held back at start until every link has asked (`_open_turns`).
        self.exchanges = Pacer(pacing.exchanges, pacing.exchanges_per_peer, paused=True)
        #: Turns for KME key requests.
        self.kms_requests = Pacer(pacing.kms_requests)
        #: The KME's max_key_per_request per peer SAE, from its last status.
        self.kme_limits: dict[str, int] = {}
        #: Key requests, merged across links (gateway/keyrequests.py).
        self.key_requests = KeyRequests(self.kme, self.kms_requests, self.kme_limits.get)
        self._lock_fd: int | None = None
        self._servers: list[web.AppRunner] = []
        self._peer_server: PeerServer | None = None
        self.channels: PeerChannels | None = None
        self.accepted: dict[str, int] = {}  # peer -> inbound channel connections accepted
        self._tasks: list[asyncio.Task[Any]] = []
        self._identities: dict[str, LinkIdentity] = {}
        self._blocking: set[asyncio.Task[None]] = set()  # the watchdog's blocks in progress
        self.audit: AuditLog | None = None
        self.started = time.time()
        self.dirty: set[str] = set()  # links whose state changed since the last flush
        self.state_files = StateFiles(config.state_dir / "links")
        self.failed: dict[str, str] = {}  # link -> why, while its link-failed alarm is raised
        self.heartbeat = time.monotonic()  # the watchdog's last round (for the stall thread)
        self.stopping = False
        self.stop_requested = asyncio.Event()  # `qkdgw stop`, SIGTERM, SIGINT
        self.running = False  # started, until it stops: a reload can be applied
        self._link_tasks: dict[str, asyncio.Task[None]] = {}  # each link's supervisor
        self._reload_lock = asyncio.Lock()  # one reload at a time
        self._reloads: set[asyncio.Task[None]] = set()  # SIGHUP's, in progress
        self._gateway = ""  # this gateway's certificate commonName ...
        self._cert_sha256 = b""  # ... and the SHA-256 of that certificate
        self._tls_digests: dict[str, str] = {}  # the TLS files as loaded at start
        self._turns: asyncio.Task[None] | None = None  # handing out the first turns
        # A pair under keepalived (docs/ha.md): this node's role, since when and why.
        self.role = NodeRole.ACTIVE if config.ha is None else NodeRole.STANDBY
        self.role_since = self.started
        self.role_reason = "not one of a pair" if config.ha is None else "starting"
        self.keepalived: Notification | None = None  # what keepalived last said
        self.takeovers = 0
        self._wanted: tuple[NodeRole, str] | None = None  # the last role asked for
        self._role_lock = asyncio.Lock()
        #: What a standby's KMS polls saw, by peer SAE ID (its status; the raw answer).
        self._standby_kms: dict[str, KmsStatus] = {}
        self._standby_seen: dict[str, SourceStatus] = {}
        self._fifo: NotifyFifo | None = None  # keepalived's notify FIFO
        self._notifying: set[asyncio.Task[Any]] = set()  # role changes, channels closing

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        c.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (c.state_dir / "links").mkdir(exist_ok=True, mode=0o700)
        self._lock()
        try:
            signer = Signer.from_files(c.peer_channel.cert, c.peer_channel.key)
        except (OSError, ValueError, AuditError) as e:
            raise ConfigError(f"peer_channel: cannot sign audit checkpoints with"
                              f" {c.peer_channel.key}: {e}") from None
        self.audit = AuditLog(c.audit_path, c.site, signer)
        self.history = self._load_history()
        self._gateway, self._cert_sha256 = certificate_sha256(c.peer_channel.cert)
        self._tls_digests = _digests(c)
        self.channels = PeerChannels(c.peer_channel, self)
        if c.ha is None:
            for link in c.links:
                self.runners[link.name] = self._runner(c, link)
            for runner in self.runners.values():
                runner.unstarted = []  # started here: (as before) each is closed on stop
                for sink in runner.sinks:
                    await sink.start()  # a SinkError stops the start: the CLI says why
            self._peer_server = PeerServer(c.peer_channel, self._peer_of, self._is_peer, self)
            await self._peer_server.start()
        else:
            # Listening from the start, on the site's virtual address (not this node's until
            # it is active, hence freebind): a takeover does not wait for it. Nothing reaches
            # a standby there, and it has no link to take a message for anyway.
            self._peer_server = PeerServer(c.peer_channel, self._peer_of, self._is_peer, self)
            self._peer_server.accepting = False
            await self._peer_server.start(freebind=True)
            ha_dir(c.state_dir).mkdir(exist_ok=True, mode=0o700)
            # No handover is in progress: keepalived's track file says so.
            write_handover(handover_file(c.ha.handover_file, c.state_dir), 0)
            await self._clean_data_plane()
            if c.ha.notify_fifo is not None:
                self._fifo = NotifyFifo(c.ha.notify_fifo, self._notified_soon)
                try:
                    self._fifo.open()
                except (OSError, ValueError) as e:
                    raise ConfigError(f"ha.notify_fifo: {e}") from None
        await self._serve_admin()
        if c.metrics is not None:
            await self._serve_metrics(c.metrics.listen, c.metrics.tls)
        self._write_audit(TrailEvent.STARTED, detail=f"{len(c.links)} link(s)"
                          + ("" if c.ha is None else f", node {c.ha.node} of a pair"))
        self._checkpoint()
        await self._poll_kms_once()  # know the KMS before the first exchange
        self._tasks.append(asyncio.create_task(self._poll_kms(), name="kms-status"))
        self._tasks.append(asyncio.create_task(self._flush_state_periodically(),
                                               name="state-flush"))
        self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
        self._tasks.append(asyncio.create_task(self._keep_history(), name="history"))
        if c.ha is None:
            for runner in self.runners.values():
                self._supervise_link(runner.name)
            self._turns = asyncio.create_task(self._open_turns(), name="turns")
            self._tasks.append(self._turns)
        self.running = True
        if c.ha is None:
            log.info("site %s up: %d link(s)", c.site, len(self.runners))
            return
        self._show_role()
        role, why = role_at_start(c.state_dir)
        log.info("site %s node %s up standby: %d link(s); %s", c.site, c.ha.node,
                 len(c.links), why)
        if role is NodeRole.ACTIVE:
            await self.set_role(role, why)

    # -- a pair under keepalived (docs/ha.md) ---------------------------------------------------

    async def set_role(self, role: NodeRole, why: str) -> None:
        """Become ROLE (keepalived said so: `qkdgw ha notify`). Changes are applied one at a
        time; one asked for while another is applied waits, and only the last one asked for
        is applied then (MASTER then BACKUP in quick succession ends standby)."""
        self._wanted = (role, why)
        async with self._role_lock:
            if self._wanted is None or self.stopping:
                return
            (role, why), self._wanted = self._wanted, None
            if role is self.role:
                self.role_reason = why
                return
            async with self._reload_lock:  # not in the middle of a reload
                if role is NodeRole.ACTIVE:
                    await self._activate(why)
                else:
                    await self._deactivate(why)

    async def _activate(self, why: str) -> None:
        """Take over: every link starts afresh from its saved state (which holds no keys: a
        standby's never does) through the restart path of the protocol: an initiator starts
        an epoch at once, a responder asks for one; a stale epoch number is corrected by
        the peer's stale-epoch answer. Nothing of the old active is used."""
        c = self.config
        began = time.monotonic()
        log.warning("node %s: becoming ACTIVE: %s", self._node, why)
        pacing = c.pacing
        self.exchanges = Pacer(pacing.exchanges, pacing.exchanges_per_peer, paused=True)
        self.channels = PeerChannels(c.peer_channel, self)
        for link in c.links:
            self.runners[link.name] = self._fresh_runner(c, link)
        for channel in self.channels.channels.values():
            channel.warm()  # the TLS handshake beside the sinks' start and the KME request
        self._replay_kms()
        if self._peer_server is not None:
            self._peer_server.accepting = True
        self.role, self.role_since, self.role_reason = NodeRole.ACTIVE, time.time(), why
        self.takeovers += 1
        self.metrics.ha_takeovers.inc()
        self._show_role()
        for name in self.runners:
            self._supervise_link(name, plane_blocked=True)
        self._turns = asyncio.create_task(self._open_turns(), name="turns")
        self._tasks.append(self._turns)
        self._write_audit(TrailEvent.HA_ACTIVE, detail=f"node {self._node}: {why}; starting"
                          f" a new epoch on {len(self.runners)} link(s)")
        log.info("node %s: active in %.1f ms, %d link(s) starting a new epoch", self._node,
                 (time.monotonic() - began) * 1e3, len(self.runners))

    def _fresh_runner(self, site: SiteConfig[Any], link: LinkConfig[Any]) -> LinkRunner:
        """LINK's runner from its saved state, or afresh if that cannot be read (moved
        aside and audited, as after a link failure)."""
        try:
            return self._runner(site, link)
        except ConfigError as e:
            path = self._state_path(link.name)
            aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
            with contextlib.suppress(OSError):
                path.replace(aside)
            log.error("link %s: %s; moved to %s, starting afresh", link.name, e, aside)
            self._write_audit(TrailEvent.STATE_DISCARDED, link=link.name, detail=f"{e}")
            return self._runner(site, link)

    async def _deactivate(self, why: str) -> None:
        """Let go: the links stop (their last state saved), each sink is removed (kernel SAs
        deleted with their policies left blocking, PPKs unloaded, key files deleted), the
        saved states keep only epoch numbers and used key IDs, and the peer channels close
        (refused while standby). Keys go first: closing a channel to a peer that is gone
        may wait for its timeout, in the background."""
        log.warning("node %s: becoming STANDBY: %s", self._node, why)
        self._observe()  # (what the links had until now)
        self.role, self.role_since, self.role_reason = NodeRole.STANDBY, time.time(), why
        self._show_role()
        if self._peer_server is not None:
            self._peer_server.accepting = False
        tasks = [self._link_tasks.pop(name) for name in list(self._link_tasks)]
        if self._turns is not None:
            tasks.append(self._turns)
            self._turns = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            with contextlib.suppress(ValueError):
                self._tasks.remove(task)
        for runner in self.runners.values():
            runner.cancel_tasks()
        self.dirty |= set(self.runners)  # the last key IDs used are kept
        await self._flush_state()
        runners, self.runners = self.runners, {}
        for runner in runners.values():
            runner.removed = True
        self.dirty.clear()
        # A standby keys nothing: its links' series go (an alert must not fire, nor stay
        # quiet, on what they were when it was active), and their history says "no key".
        self.metrics.forget(set(runners))
        self.metrics.channel_up.clear()
        self._unkeyed(runners)
        for runner in runners.values():
            for sink in [s for s in runner.sinks if s not in runner.unstarted]:
                await self._remove_sink(runner.name, sink)
        await self._forget_keys()
        for table in (self.failed, self.fingerprints):
            table.clear()
        self._write_audit(TrailEvent.HA_STANDBY, detail=f"node {self._node}: {why}; holds"
                          " no keys")
        if self._peer_server is not None:
            self._peer_server.close_channels()
        channels, self.channels = self.channels, None
        if channels is not None:
            self._in_background(channels.close(), "peer-channels-close")

    def _in_background(self, coroutine: Any, name: str) -> None:
        """Run COROUTINE without waiting for it; its failure is logged."""
        task = asyncio.create_task(coroutine, name=name)
        self._notifying.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._notifying.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed", name, exc_info=t.exception())

        task.add_done_callback(done)

    async def _clean_data_plane(self) -> None:
        """A standby's data plane at start: each sink takes it over (adopting what a crash
        left, policies blocking) and is removed again, so no stale SA stays behind."""
        c = self.config
        for link in c.links:
            context = self._sink_context(c, link)
            for sink in [s.build(context) for s in link.sinks]:
                try:
                    async with asyncio.timeout(SINK_TIMEOUT):
                        await sink.start()
                except Exception as e:  # it installed nothing, or will be retried: go on
                    log.error("link %s: starting %s to clean it failed: %s", link.name,
                              sink.name, _describe(e))
                await self._remove_sink(link.name, sink)
        await self._forget_keys()

    async def _remove_sink(self, link: str, sink: Sink) -> None:
        try:
            async with asyncio.timeout(SINK_TIMEOUT):
                await sink.remove()
        except Exception as e:  # one sink's failure must not keep the others
            log.error("link %s: removing %s failed: %s", link, sink.name, _describe(e))

    async def _forget_keys(self) -> None:
        """Rewrite every saved link state without its keys' references: a standby holds no
        keys, and its next activation starts every link blocked, retiring nothing."""
        states = {}
        for link in self.config.links:
            try:
                snapshot = self._load_snapshot(link.name)
            except CoreError:
                continue  # moved aside when the link starts
            if snapshot is not None:
                states[link.name] = snapshot.without_keys().model_dump_json().encode()
        await self.state_files.write(states)

    @property
    def _node(self) -> str:
        return self.config.ha.node if self.config.ha else self.config.site

    def _show_role(self) -> None:
        for role in NodeRole:
            self.metrics.ha_role.labels(role.value).set(1 if role is self.role else 0)

    def ha_status(self) -> HaStatus | None:
        ha = self.config.ha
        if ha is None:
            return None
        k = self.keepalived
        return HaStatus(node=ha.node, role=self.role.value, since=round(self.role_since, 3),
                        reason=self.role_reason, keepalived_state=k.state if k else None,
                        keepalived_instance=k.name if k else None, takeovers=self.takeovers)

    def _notified_soon(self, n: Notification) -> None:
        """A line from keepalived's FIFO (read in a callback): applied in a task of its own,
        whose failure is logged (the next notification applies again)."""
        self._in_background(self.notified(n), f"applying keepalived's {n.state}")

    async def notified(self, n: Notification) -> HaStatus | None:
        """keepalived's notify, through `qkdgw ha notify`."""
        self.keepalived = n
        log.info("node %s: keepalived %s %s: %s", self._node, n.type, n.name, n.state)
        await self.set_role(n.role, f"keepalived {n.name}: {n.state}")
        return self.ha_status()

    async def handover(self) -> Handover:
        """Planned switchover: put this node's VRRP instance in FAULT through its track
        file; keepalived gives the addresses up, notifies, and this node goes standby; the
        file is set back a moment later (HANDOVER_SETTLE) so the node returns to BACKUP."""
        ha = self.config.ha
        if ha is None:
            raise HandoverRefused("this gateway is not one of a pair (no `ha:` in its"
                                  " configuration)")
        if self.role is not NodeRole.ACTIVE:
            raise HandoverRefused(f"node {ha.node} is standby: run the handover on the"
                                  " active node")
        path = handover_file(ha.handover_file, self.config.state_dir)
        began = time.monotonic()
        write_handover(path, 1)
        try:
            while self.role is NodeRole.ACTIVE:
                if time.monotonic() - began > ha.handover_timeout:
                    raise HandoverRefused(
                        f"keepalived did not take the addresses from node {ha.node} within"
                        f" {ha.handover_timeout:g} s: does its vrrp_instance track {path}"
                        " (track_file, weight 0), and notify `qkdgw ha notify`? (docs/ha.md)")
                await asyncio.sleep(HANDOVER_POLL)
            standby_after = time.monotonic() - began
            await asyncio.sleep(HANDOVER_SETTLE)
        finally:
            write_handover(path, 0)
        self._write_audit(TrailEvent.HA_STANDBY, detail=f"node {ha.node}: handover done,"
                          f" standby after {standby_after * 1e3:.0f} ms")
        return Handover(node=ha.node, standby_after_ms=round(standby_after * 1e3, 1))

    def _standby_link(self, link: LinkConfig[Any]) -> LinkStatus:
        """A link as a standby shows it: no key, nothing installed."""
        kms = self._standby_kms.get(link.peer.sae_id) or KmsStatus(
            ok=False, reason="not polled yet")
        policy = self.config.link_policy(link)
        return LinkStatus(
            link=link.name, role=link.role, peer=link.peer.name,
            mode=policy.mode.value, state=NodeRole.STANDBY.value,
            epoch=0, blocked=True, suite=None, key_age=None, fingerprint=None, rekeys=0,
            interval=policy.interval, hard_lifetime=policy.hard_lifetime,
            qber_threshold=policy.qber_threshold,
            data_planes=[str(getattr(s, "type", type(s).__name__)) for s in link.sinks],
            last_rekey_latency=None, next_rekey_in=None, alarms={}, kms=kms)

    def _replay_kms(self) -> None:
        """The links a takeover starts know the KMS as the standby last saw it: no poll
        delays their first exchange."""
        answers = [(st, [r for r in self.runners.values() if r.config.peer.sae_id == sae])
                   for sae, st in self._standby_seen.items()]
        shares = _shares([((st.kme_id, st.peer_kme_id), r)
                          for st, runners in answers for r in runners])
        for st, runners in answers:
            self._observed(st, runners, shares)
        self._standby_seen.clear()  # the next standby period polls afresh

    def _runner(self, site: SiteConfig[Any], link: LinkConfig[Any]) -> LinkRunner:
        """A runner for LINK of SITE, from its saved state; its sinks built, not started.
        Raises ConfigError for a state file that cannot be read."""
        self._identities[link.name] = LinkIdentity(
            link=link.name, role=Role(link.role), gateway=self._gateway,
            cert_sha256=self._cert_sha256, sae_id=site.kms.sae_id,
            peer_gateway=link.peer.name, peer_sae_id=link.peer.sae_id, kem=link.kem)
        try:
            machine = self._machine(link, self._load_snapshot(link.name),
                                    site.link_policy(link))
        except CoreError as e:
            raise ConfigError(f"{self._state_path(link.name)}: {e}; move it away to start"
                              " this link afresh (the peer resynchronises)") from None
        context = self._sink_context(site, link)
        sinks: list[Sink] = [s.build(context) for s in link.sinks]
        peer = self._channels().channel(link.name, link.peer.name, link.peer.address)
        return LinkRunner(self, link, machine, sinks, peer, sink_configs=list(link.sinks),
                          sink_context=context, unstarted=list(sinks))

    def _channels(self) -> PeerChannels:
        """The site's peer channels (made at start, before any link)."""
        if self.channels is None:
            raise RuntimeError("the peer channels are used before the daemon started")
        return self.channels

    def _sink_context(self, site: SiteConfig[Any], link: LinkConfig[Any]) -> SinkContext:
        return SinkContext(link.name, site.lifetimes(link), self, site.peer_channel.listen,
                           link.peer.address)

    def _supervise_link(self, name: str, *, plane_blocked: bool = False) -> None:
        self.metrics.mode.labels(name, self.runners[name].machine.policy.mode.value).set(1)
        task = asyncio.create_task(self._supervise(name, plane_blocked), name=f"link-{name}")
        self._link_tasks[name] = task
        self._tasks.append(task)

    async def _open_turns(self) -> None:
        """Hand out exchange turns once every initiator link has asked the pacer for its
        first (or GATHER_LIMIT passed): after a restart the links nearest their hard
        lifetime go first, not those that happened to ask first. (Asked the pacer, not only
        wanted to: the core's request reaches the pacer from a task of its own.)"""
        began = time.monotonic()
        while time.monotonic() < began + GATHER_LIMIT and any(
                not r.asked for r in self.runners.values()
                if r.machine.role is Role.INITIATOR):
            # Finely at first: a takeover's links have all asked within milliseconds, and
            # each one waited for is a millisecond of outage.
            fine = time.monotonic() < began + GATHER_FINE
            await asyncio.sleep(GATHER_POLL_FINE if fine else GATHER_POLL)
        self.exchanges.resume()

    async def _switches_done(self) -> None:
        """Wait (up to STOP_SWITCH_WAIT) until no running link is switching keys, so that a
        planned stop leaves every state file naming the key its data plane sends on."""
        deadline = time.monotonic() + STOP_SWITCH_WAIT
        while time.monotonic() < deadline and any(
                r.machine.keys.switching for r in self.runners.values()
                if r.task is not None and not r.task.done()):
            await asyncio.sleep(STOP_SWITCH_POLL)

    def _machine(self, link: LinkConfig[Any], snapshot: Snapshot | None,
                 policy: Policy | None = None) -> LinkMachine:
        return LinkMachine(self._identities[link.name], policy or self.config.link_policy(link),
                           now=time.time(), snapshot=snapshot, check_transitions=self.debug,
                           admission=True)

    async def stop(self) -> None:
        """Stop; each sink leaves its data plane as its stop behaviour says (a key file
        stays, kernel SAs are deleted and policies left blocking ...)."""
        await self._switches_done()
        self.stopping = True
        self.running = False
        if self._fifo is not None:
            self._fifo.close()
        for task in self._notifying:
            task.cancel()
        async with self._reload_lock:  # a reload in progress finishes first
            pass
        for task in self._reloads:
            task.cancel()
        for task in self._tasks:
            task.cancel()
        for runner in self.runners.values():
            runner.cancel_tasks()
        self.key_requests.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush_state()
        self.state_files.close()
        self._observe()
        self._unkeyed(self.runners)  # (until the next start: nobody keys them)
        self._save_history()
        if self.channels is not None:
            await self.channels.close()
        for runner in self.runners.values():
            for sink in [s for s in runner.sinks if s not in runner.unstarted]:
                try:
                    await sink.close()
                except Exception as e:  # one sink's failure must not keep the others open
                    log.error("link %s: closing %s failed: %s", runner.name, sink.name,
                              _describe(e))
        if self._peer_server is not None:
            await self._peer_server.stop()
        for server in self._servers:
            await server.cleanup()
        await self.kme.close()
        self._write_audit(TrailEvent.STOPPED)
        self._checkpoint()
        if self.audit is not None:
            self.audit.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.admin_socket.unlink()
        log.info("site %s stopped", self.config.site)

    # -- history (gateway/history.py) -------------------------------------------------------

    @property
    def _history_path(self) -> Path:
        return self.config.state_dir / "history.json"

    def _load_history(self) -> History:
        """The saved history; an unreadable one is moved aside (kept for a look) and the
        daemon starts with an empty one: the plots are not worth refusing to run for."""
        path = self._history_path
        try:
            return History.load(path)
        except ValueError as e:
            aside = path.with_suffix(".unreadable")
            with contextlib.suppress(OSError):
                path.replace(aside)
            log.warning("history: %s; moved to %s, starting an empty one", e, aside)
            return History()

    def _save_history(self) -> None:
        self._write_history(self.history.snapshot())

    def _observe(self) -> None:
        """Note each link's condition and alarms in its history (a row when they change)."""
        now = time.time()
        changed = False
        for r in self.runners.values():
            changed |= self._observe_link(r, now)
        if changed:
            self.changes.bump()

    def _observe_link(self, r: LinkRunner, now: float) -> bool:
        m = r.machine
        alarms = set(m.alarms) | ({Alarm.LINK_FAILED} if r.name in self.failed else set())
        return self.history.link(r.name).observe(now, condition(m), alarm_bits(alarms))

    def _unkeyed(self, links: Iterable[str]) -> None:
        """LINKS are keyed by nobody from now (this daemon stops, or goes standby)."""
        now = time.time()
        for name in links:
            self.history.link(name).observe(now, Condition.NONE, 0)
        self.changes.bump()

    async def _keep_history(self) -> None:
        saved = time.monotonic()
        while True:
            await asyncio.sleep(HISTORY_PERIOD)
            self._observe()
            if time.monotonic() - saved >= SAVE_PERIOD:
                saved = time.monotonic()
                self.history.trim(time.time())
                snapshot = self.history.snapshot()  # (on the loop: the rings change on it)
                await asyncio.to_thread(self._write_history, snapshot)

    def _write_history(self, snapshot: HistorySnapshot) -> None:
        try:
            write_private(self._history_path, snapshot.encode())
        except OSError as e:
            log.error("history: cannot save it to %s: %s", self._history_path, e.strerror)

    def has_link(self, link: str) -> bool:
        return any(x.name == link for x in self.config.links)

    def history_view(self, link: str, seconds: float) -> LinkHistoryView:
        self._observe()  # (first: the window ends now, after it)
        now = time.time()
        cfg = next((x for x in self.config.links if x.name == link), None)
        pair = self._pair(cfg.peer.sae_id) if cfg is not None else None
        return view(self.history, link, pair, now - seconds, now)

    def _lock(self) -> None:
        path = self.config.state_dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{self.config.state_dir}: another qkdgw runs with this state"
                              " directory") from None
        self._lock_fd = fd

    def _state_path(self, link: str) -> Path:
        return self.state_files.path(link)

    def _load_snapshot(self, link: str) -> Snapshot | None:
        path = self._state_path(link)
        try:
            return Snapshot.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as e:
            raise CoreError(f"unreadable link state ({_invalid(e)})") from None

    # -- supervision --------------------------------------------------------------------------

    async def _supervise(self, name: str, plane_blocked: bool = False) -> None:
        """Run the link; when it fails, block it, say so, and run it again from its saved
        state (with backoff while it keeps failing). PLANE_BLOCKED: its data plane holds
        none of its keys (a takeover)."""
        backoff = RESTART_BACKOFF
        while True:
            runner = self.runners[name]
            runner.task = asyncio.create_task(runner.run(plane_blocked=plane_blocked),
                                              name=f"link-{name}-run")
            began = time.monotonic()
            try:
                await runner.task
                return  # the daemon stops
            except asyncio.CancelledError:
                if not runner.stuck or (task := asyncio.current_task()) is None \
                        or task.cancelling():
                    raise  # the daemon stops
                why = runner.stuck
            except Exception as e:
                log.error("link %s: unexpected failure", name, exc_info=True)
                why = _describe(e)
            if self.stopping:
                return
            if time.monotonic() - began > RESTART_BACKOFF_MAX:
                backoff = RESTART_BACKOFF  # it ran well for a while: a new failure
            await self._link_failed(runner, why, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
            self.runners[name] = self._restarted(runner)
            plane_blocked = True

    async def _link_failed(self, runner: LinkRunner, why: str, restart_in: float) -> None:
        """Fail closed: the link's traffic blocked, its in-flight work dropped, the alarm
        raised, the audit trail told. The state in memory is not saved (it may be half
        changed); the restart takes the last saved state, which the protocol absorbs."""
        name = runner.name
        runner.cancel_tasks()
        runner.give_turn_back()
        self.dirty.discard(name)
        detail = f"{why}; traffic blocked, restarting in {restart_in:g} s"
        self.failed[name] = detail
        log.error("link %s: ALARM %s: %s", name, Alarm.LINK_FAILED.value, detail,
                  extra={"link": name, "alarm": Alarm.LINK_FAILED.value})
        self.metrics.alarm.labels(name, Alarm.LINK_FAILED.value).set(1)
        self.metrics.failures.labels(name, Cause.LINK_FAILED.value).inc()
        self._write_audit(TrailEvent.LINK_FAILED, link=name, epoch=runner.machine.current_epoch,
                          detail=detail)
        await self._block(runner, f"link failed: {why}")

    async def _block(self, runner: LinkRunner, reason: str) -> None:
        """Block every started sink of the link, whatever state its task is in."""
        runner.active_until = None
        for sink in [s for s in runner.sinks if s not in runner.unstarted]:
            try:
                async with asyncio.timeout(SINK_TIMEOUT):
                    await sink.block(runner.name, reason)
            except Exception as e:
                log.error("link %s: blocking %s failed: %s", runner.name, sink.name,
                          _describe(e))
                self.metrics.failures.labels(runner.name, Cause.SINK.value).inc()

    def _restarted(self, old: LinkRunner) -> LinkRunner:
        """A new runner for the link, from its saved state (afresh if that is unreadable:
        the peer resynchronises), with the same sinks and peer channel."""
        try:
            snapshot = self._load_snapshot(old.name)
        except CoreError as e:
            path = self._state_path(old.name)
            aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
            with contextlib.suppress(OSError):
                path.replace(aside)
            log.error("link %s: %s: %s; moved to %s, starting afresh", old.name, path, e, aside)
            self._write_audit(TrailEvent.STATE_DISCARDED, link=old.name, detail=f"{e}")
            snapshot = None
        machine = self._machine(old.config, snapshot)
        return LinkRunner(self, old.config, machine, old.sinks, old.peer,
                          sink_configs=old.sink_configs, sink_context=old.sink_context,
                          unstarted=old.unstarted, swap=old.swap)

    async def _watchdog(self) -> None:
        """Hold every link to its hard lifetime, whatever its task is doing."""
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD)
            self.heartbeat = time.monotonic()
            now = time.time()
            for runner in list(self.runners.values()):
                due = runner.active_until
                if due is None or now < due + WATCHDOG_SLACK:
                    continue
                why = f"its key passed its hard lifetime {now - due:.1f} s ago and the link" \
                      " did not block it"
                log.error("link %s: watchdog: %s", runner.name, why)
                runner.stuck = f"watchdog: {why}"
                runner.active_until = None
                # Not awaited here: a sink that hangs must not hold up the other links.
                blocking = asyncio.create_task(self._block(runner, "hard lifetime (watchdog)"))
                self._blocking.add(blocking)
                blocking.add_done_callback(self._blocking.discard)
                if runner.task is not None:
                    runner.task.cancel()

    # -- reload -------------------------------------------------------------------------------

    async def reload(self, requested: Path | None = None) -> Reloaded:
        """Read the configuration file again and apply the difference; REQUESTED: the file
        `qkdgw reload` names, which must be the one this daemon runs. Raises ReloadRefused,
        having changed nothing, for a file that does not pass `qkdgw check-config` (with its
        message) or has changes that cannot be applied live (each named)."""
        async with self._reload_lock:
            if self.source is None:
                raise ReloadRefused("this daemon was not started from a configuration file")
            if not self.running:
                raise ReloadRefused("the daemon is starting or stopping: try again")
            path = self.source.path
            if requested is not None and requested.resolve() != path.resolve():
                raise ReloadRefused(f"this daemon runs {path}, not {requested}")
            try:
                # (in a thread: a hub's file takes a second per 1,000 links to parse and
                # validate, which the event loop must not wait for)
                new, digest = await asyncio.to_thread(self.source.read)
                files = _digests(new)
            except (ConfigError, ValueError, OSError) as e:
                raise ReloadRefused(config_problem(e)) from None
            try:
                p = plan(self.config, new, old_files=self._tls_digests, new_files=files)
            except NotLive as e:
                raise ReloadRefused(f"{path}: {e}") from None
            if self.role is NodeRole.STANDBY:  # no link runs: the next takeover uses it
                for name in p.removed:
                    await self.state_files.delete(name)
                self.metrics.forget(set(p.removed))
                self.config = new
                self.kms_requests.resize(new.pacing.kms_requests)
                return self._reloaded(p, path, digest)
            try:  # everything that can fail comes before any change
                added = {n: self._runner(new, new.link(n)) for n in p.added}
            except ConfigError as e:
                raise ReloadRefused(str(e)) from None
            await self._poll_kms_once(added)  # they know the KMS before their first exchange
            for name in p.removed:
                await self._remove_link(name)
            self.metrics.forget(set(p.removed))
            # From here to the end, no await: no link restarts halfway between the two
            # configurations (a restarted link takes its policy from self.config).
            self.config = new
            self.exchanges.resize(new.pacing.exchanges, new.pacing.exchanges_per_peer)
            self.kms_requests.resize(new.pacing.kms_requests)
            replaced = [self._change_link(new, change) for change in p.changed]
            for name, runner in added.items():
                self.runners[name] = runner
                self._supervise_link(name)
            result = self._reloaded(p, path, digest)
            for change, channel in zip(p.changed, replaced, strict=True):
                if channel is not None:
                    await self._channels().release(change.name, channel)
            return result

    def _reloaded(self, p: Plan, path: Path, digest: str) -> Reloaded:
        """A reload applied: its audit record, metric, log line and answer."""
        old, self.config_sha256 = self.config_sha256, digest
        result = Reloaded(
            config=str(path), old_sha256=old, new_sha256=digest, added=list(p.added),
            removed=list(p.removed), changed={c.name: list(c.what) for c in p.changed},
            site=list(p.site), unchanged=p.unchanged)
        self._write_audit(TrailEvent.RELOADED, detail=_summary(p),
                          config=result.model_dump(exclude={"unchanged"}))
        self.metrics.reloads.labels("applied").inc()
        log.info("configuration reloaded from %s (sha256 %s): %s", path, digest, _summary(p))
        return result

    async def _remove_link(self, name: str) -> None:
        """Stop the link for good: its task and channel end, each sink is removed (its stop
        behaviour, then its key files), its state file goes (its metrics: the caller's)."""
        task = self._link_tasks.pop(name)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._tasks.remove(task)
        runner = self.runners.pop(name)  # from here the peer channel refuses the link
        runner.removed = True
        self.dirty.discard(name)  # (before any await: no flush looks for it again)
        runner.cancel_tasks()
        runner.give_turn_back()
        await self._channels().release(name, runner.peer)
        for sink in [s for s in runner.sinks if s not in runner.unstarted]:
            try:
                async with asyncio.timeout(SINK_TIMEOUT):
                    await sink.remove()
            except Exception as e:  # one sink's failure must not keep the others
                log.error("link %s: removing %s failed: %s", name, sink.name, _describe(e))
        await self.state_files.delete(name)
        for table in (self.failed, self.fingerprints, self._identities):
            table.pop(name, None)
        self.history.forget([name])
        log.info("link %s removed: its sinks stopped as their on_stop says, its key files and"
                 " state file deleted", name)

    def _change_link(self, site: SiteConfig[Any], change: LinkChange) -> PeerChannel | None:
        """Give a running link its new configuration without touching its current key: the
        policy through its own queue, a new peer address at its next message, new sinks at
        its next epoch. The channel to the old address, if it changed, for the caller to
        close."""
        runner = self.runners[change.name]
        link = site.link(change.name)
        if change.policy:
            policy = site.link_policy(link)
            was = runner.machine.policy.mode
            if policy.mode != was:
                self.metrics.mode.labels(change.name, was.value).set(0)
                self.metrics.mode.labels(change.name, policy.mode.value).set(1)
            runner.queue.put_nowait(_PolicyChanged(policy))
        old = None
        if change.address:
            old, runner.peer = runner.peer, self._channels().channel(
                change.name, link.peer.name, link.peer.address)
        if change.sinks:
            runner.swap = self._sink_swap(runner, list(link.sinks),
                                          self._sink_context(site, link))
        runner.config = link
        log.info("link %s: reloaded: %s changed%s", change.name, ", ".join(change.what),
                 "; the sinks change at the next epoch" if change.sinks else "")
        return old

    def _sink_swap(self, runner: LinkRunner, configs: list[SinkConfig],
                   context: SinkContext) -> SinkSwap | None:
        """The sinks CONFIGS describe: a running one kept where its configuration and
        context are the same, the others built anew. None if that is what runs."""
        pool = list(zip(runner.sink_configs, runner.sinks, strict=True)) \
            if context == runner.sink_context else []
        sinks: list[Sink] = []
        for config in configs:
            same = next((i for i, (c, _) in enumerate(pool) if c == config), None)
            sinks.append(pool.pop(same)[1] if same is not None else config.build(context))
        if sinks == runner.sinks:
            return None
        leaving = [(s, c not in configs) for c, s in
                   zip(runner.sink_configs, runner.sinks, strict=True) if s not in sinks]
        return SinkSwap(configs, sinks, context, leaving)

    def reload_on_signal(self) -> None:
        """SIGHUP: reload as `qkdgw reload` does; the outcome goes to the log."""
        task = asyncio.create_task(self._reload_logged(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload_logged(self) -> None:
        log.info("SIGHUP: reloading the configuration")
        try:
            await self.reload()
        except ReloadRefused as e:
            self.metrics.reloads.labels("refused").inc()
            log.error("reload refused: %s", e)

    # -- events in --------------------------------------------------------------------------

    def _peer_of(self, link: str) -> str | None:
        """The peer channel asks for every frame: the links as they are now, reloads
        included."""
        runner = self.runners.get(link)
        return None if runner is None else runner.config.peer.name

    def _is_peer(self, name: str) -> bool:
        return any(r.config.peer.name == name for r in self.runners.values())

    def deliver(self, link: str, message: Message, peer_cert: bytes) -> bool:
        """A peer message for LINK (the channel checked the peer is the link's): queued,
        or refused when the link has MAX_PEER_BACKLOG waiting (the others are not held)."""
        runner = self.runners[link]
        if runner.peer_backlog >= MAX_PEER_BACKLOG:
            return False
        runner.peer_backlog += 1
        runner.peer.heard(link)
        runner.queue.put_nowait(received(message, peer_cert))
        return True

    def link_unknown(self, link: str, detail: str) -> None:
        """The peer has no such link (yet): the link's core raises peer-link-unknown."""
        runner = self.runners.get(link)
        if runner is not None:
            runner.queue.put_nowait(LinkUnknownAtPeer(detail))

    def channel_opened(self, peer: str, inbound: bool) -> None:
        if inbound:
            self.accepted[peer] = self.accepted.get(peer, 0) + 1
            self.metrics.channel_accepts.labels(peer).inc()
            # Not its first: the peer restarted, or its pair's other node took over, and
            # our own channel to it may end at a box that is gone.
            if self.accepted[peer] > 1 and self.channels is not None:
                self.channels.peer_reconnected(peer)
        else:
            self.metrics.channel_connects.labels(peer).inc()

    def rekey_needed(self, link: str, cause: RekeyCause, detail: str) -> None:
        """A sink says its data plane needs a new key (SinkEvents): the link rekeys now."""
        log.info("link %s: rekey needed (%s): %s", link, cause.value, detail)
        if (runner := self.runners.get(link)) is not None:
            runner.queue.put_nowait(RekeyRequested(f"{cause.value}: {detail}"))

    def key_provided(self, link: str, key: ProvidedKey) -> None:
        """A sink hands out a key (SinkEvents): audited by ID and fingerprint, counted. A
        record that cannot be written is SinkError: the key is not handed out."""
        if not self._write_audit(TrailEvent.KEY_PROVIDED, link=link, epoch=key.epoch,
                                 key_ids=[key.key_id], fingerprint=key.fingerprint,
                                 provided={"bits": key.bits, "client": key.client,
                                           "peer": key.peer, "origin": key.origin}):
            raise SinkError("the audit trail cannot record it")
        log.info("link %s epoch %d: key %s (%d bits, fingerprint %s) to %s, shared with %s",
                 link, key.epoch, key.key_id, key.bits, key.fingerprint, key.client, key.peer)
        self.metrics.keys_provided.labels(link, "origin" if key.origin else "peer").inc()

    def rekey(self, link: str | None) -> list[str]:
        names = [link] if link else list(self.runners)
        for name in names:
            self.runners[name].queue.put_nowait(RekeyRequested("operator"))
        return names

    async def _poll_kms(self) -> None:
        while True:
            await asyncio.sleep(self.config.kms_status_interval)
            await self._poll_kms_once()

    async def _poll_kms_once(self, links: dict[str, LinkRunner] | None = None) -> None:
        """Poll the KMS status for every link (or those of LINKS: links a reload adds,
        before they start), and tell each its share of its KME pair's supply."""
        if links is None and self.role is NodeRole.STANDBY:
            await self._poll_standby()
            return
        links = self.runners if links is None else links
        by_peer: dict[str, list[str]] = {}
        for runner in links.values():
            by_peer.setdefault(runner.config.peer.sae_id, []).append(runner.name)
        answers: list[tuple[SourceStatus, list[LinkRunner]]] = []
        for peer_sae, names in by_peer.items():
            # (by name, when their turn comes: a link may have been restarted, or removed
            # by a reload, since)
            runners = [r for n in names if (r := links.get(n)) is not None]
            try:
                st = await self._poll_status(peer_sae, runners)
            except Exception as e:  # never foreseen: no QKD for these links, and say why
                log.error("KMS status for %s: unexpected failure", peer_sae, exc_info=True)
                for runner in runners:
                    await runner.queue.put(KmsUnreachable(
                        f"status poll failed: {_describe(e)}"))
            else:
                if st is not None:
                    answers.append((st, runners))
        shares = _shares([((st.kme_id, st.peer_kme_id), r)
                          for st, runners in answers for r in runners])
        for st, runners in answers:
            self._observed(st, [r for r in runners if not r.removed], shares)

    async def _poll_standby(self) -> None:
        """A standby keeps its KMS client up: the status for each peer SAE, for its own
        status and metrics, and for the links a takeover starts (`_replay_kms`)."""
        for peer_sae in dict.fromkeys(link.peer.sae_id for link in self.config.links):
            names = [link.name for link in self.config.links if link.peer.sae_id == peer_sae]
            try:
                st = await self.kme.source_status(peer_sae)
            except Exception as e:  # KmsError, or never foreseen: shown, never fatal
                why = str(e) if isinstance(e, KmsError) else _describe(e)
                self._standby_kms[peer_sae] = KmsStatus(ok=False, reason=why, error=why)
                self._standby_seen.pop(peer_sae, None)
                for name in names:
                    self._kms_unknown(name)
                continue
            self.kme_limits[peer_sae] = st.max_key_per_request
            self._standby_seen[peer_sae] = st
            self._standby_kms[peer_sae] = KmsStatus(
                ok=True, reason="", stored_key_count=st.stored_key_count, qber=st.qber,
                key_rate=st.key_rate, link_up=st.link_up, kme=st.kme_id)
            for name in names:
                self.metrics.kms_up.labels(name).set(1)
                self._set_stored(name, st.stored_key_count)

    def _kms_unknown(self, link: str) -> None:
        """The KME did not answer: LINK's KMS figures are unknown, not their last values
        (a QBER alert must not fire, nor stay quiet, on a stale reading)."""
        self.metrics.kms_up.labels(link).set(0)
        for gauge in (self.metrics.kms_qber, self.metrics.kms_key_rate,
                      self.metrics.kms_stored):
            with contextlib.suppress(KeyError):
                gauge.remove(link)

    def _pair(self, peer_sae: str) -> str:
        """The KME pair serving PEER_SAE's links, as the KME named it (until it answers: by
        the SAEs)."""
        return self.history.pairs.get(peer_sae) or f"{self.config.kms.sae_id} → {peer_sae}"

    def _set_stored(self, link: str, stored: int | None) -> None:
        """The KMS's stored key count for LINK; None (a source that gives none): no series."""
        if stored is None:
            with contextlib.suppress(KeyError):
                self.metrics.kms_stored.remove(link)
        else:
            self.metrics.kms_stored.labels(link).set(stored)

    def _kms_sample(self, peer_sae: str, st: SourceStatus | None) -> None:
        """Note a status poll of PEER_SAE's KME pair (ST None: it failed)."""
        pair = self._pair(peer_sae)
        if st is None:
            self.history.pair(pair).sample(time.time(), False, None, None, None)
        else:
            self.history.pair(pair).sample(time.time(), True, st.stored_key_count, st.qber,
                                           st.key_rate)

    async def _poll_status(self, peer_sae: str, runners: list[LinkRunner]
                           ) -> SourceStatus | None:
        """The KME's status for PEER_SAE (None, and the links told, when it failed)."""
        try:
            st = await self.kme.source_status(peer_sae)
        except KmsError as e:
            self._kms_sample(peer_sae, None)
            for r in [r for r in runners if not r.removed]:
                self._kms_unknown(r.name)
                r.kms_seen = KmsStatus(ok=False, reason=str(e), error=str(e))
                await r.queue.put(KmsUnreachable(str(e)))
            return None
        self.kme_limits[peer_sae] = st.max_key_per_request
        return st

    def _observed(self, st: SourceStatus, runners: list[LinkRunner],
                  shares: dict[str, tuple[float, int]]) -> None:
        """Tell RUNNERS what the KME's status ST says, and their share of its supply."""
        peer_sae = st.slave if st.master == self.config.kms.sae_id else st.master
        self.history.pairs[peer_sae] = f"{st.kme_id} → {st.peer_kme_id}"
        self._kms_sample(peer_sae, st)
        for r in runners:  # (no metrics for a removed link)
            share, sharing = shares.get(r.name, (1.0, 1))
            event = KmsStatusObserved(  # every number bounded by the client's Status model
                stored_key_count=st.stored_key_count, key_size=st.key_size,
                kme_id=st.kme_id, peer_kme_id=st.peer_kme_id, qber=st.qber,
                key_rate=st.key_rate, link_up=st.link_up, share=share, sharing=sharing)
            m = self.metrics
            m.kms_up.labels(r.name).set(1)
            self._set_stored(r.name, st.stored_key_count)
            if event.qber is not None:
                m.kms_qber.labels(r.name).set(event.qber)
            if event.key_rate is not None:
                m.kms_key_rate.labels(r.name).set(event.key_rate)
            r.kms_seen = KmsStatus(ok=True, reason="", stored_key_count=st.stored_key_count,
                                   qber=event.qber, key_rate=event.key_rate,
                                   link_up=event.link_up, kme=st.kme_id)
            r.queue.put_nowait(event)

    # -- effects out ------------------------------------------------------------------------

    def stamp(self, message: Message) -> Message:
        """Commit and Ack carry this site's audit head: the peer records it in its trail."""
        if isinstance(message, Commit | Ack) and self.audit is not None:
            head = self.audit.head
            return message.model_copy(update={"audit": AuditHead(
                site=self.config.site, seq=head.seq, hash=head.hash)})
        return message

    def note_fingerprint(self, link: str, epoch: int, fingerprint: str) -> None:
        """The status names the key of the epoch a link sends on (the newest 16 kept)."""
        prints = self.fingerprints.setdefault(link, {})
        prints[epoch] = fingerprint
        for old in sorted(prints)[:-16]:
            del prints[old]

    def peer_head(self, runner: LinkRunner, message: Message) -> None:
        """Record the peer's audit head from the Commit or Ack that completed an epoch."""
        head = message.audit if isinstance(message, Commit | Ack) else None
        if head is not None:
            self._write_audit(TrailEvent.PEER_HEAD, link=runner.name, epoch=message.epoch,
                              peer=Head(head.seq, head.hash), peer_site=head.site)

    def record(self, runner: LinkRunner, r: Record) -> None:
        link = runner.name
        if r.kind is K.ACTIVATED and link in self.failed:
            del self.failed[link]
            log.info("link %s: alarm %s cleared", link, Alarm.LINK_FAILED.value)
            self.metrics.alarm.labels(link, Alarm.LINK_FAILED.value).set(0)
        ids = ",".join(r.key_ids) or "-"
        latency = f" in {r.latency * 1e3:.1f} ms" if r.latency is not None else ""
        log.log(logging.INFO if r.kind in LOGGED else logging.DEBUG,
                "link %s epoch %d %s%s key_ids=%s fingerprint=%s%s", link, r.epoch, r.kind,
                latency, ids, r.fingerprint or "-", f" ({r.detail})" if r.detail else "",
                extra={"link": link, "epoch": r.epoch, "event": r.kind})
        if r.kind in (K.ACTIVATED, K.REKEYED) and r.fingerprint:
            self.note_fingerprint(link, r.epoch, r.fingerprint)
        if runner.machine.role is Role.INITIATOR:  # its peer's share of the turns
            if r.kind is K.REKEYED:
                self.exchanges.succeeded(runner.config.peer.name)
            elif r.kind is K.UNCONFIRMED or r.cause is Cause.TIMEOUT:
                self.exchanges.failed(runner.config.peer.name)
        if r.kind is K.REKEYED:
            o = runner.machine.outbound
            now = time.time()
            self.history.rekeyed(link, now, r.epoch, r.latency, o is not None and o.suite.qkd)
            self._observe_link(runner, now)  # (a new key: its condition at once)
            self.changes.bump()
            suite = runner.machine.outbound.suite.name if runner.machine.outbound else ""
            self.metrics.rekeys.labels(link, suite).inc()
            if r.latency is not None:
                runner.last_latency = round(r.latency, 6)
                self.metrics.latency.labels(link).observe(r.latency)
            o = runner.machine.outbound
            runner.last_rekey = LastRekey(epoch=r.epoch, started_at=r.started,
                                          activated_at=o.activated_at if o else None)
        elif r.kind is K.DISCARDED and r.cause is not None:
            self.metrics.failures.labels(link, r.cause.value).inc()
            self.history.gave_up(link, time.time(), r.epoch, r.cause)
            self.changes.bump()
        if r.kind in AUDITED:
            sinks = [s.name for s in runner.sinks] \
                if r.kind in (K.INSTALLED, K.ACTIVATED, K.RETIRED) else []
            self._write_audit(r.kind, link=link, epoch=r.epoch, key_ids=r.key_ids,
                              fingerprint=r.fingerprint, sinks=sinks, detail=r.detail)

    def _write_audit(self, event: str, **fields: Any) -> bool:
        """Append to the trail; whether it was written (or there is no trail). A record that
        cannot be written (a full disk, an I/O error) is counted and logged; if it records a
        key's handling, the link fails with it (its traffic blocked until records can be
        written again): no key goes unaudited."""
        if self.audit is None:
            return True
        checkpoints = self.audit.checkpoints
        try:
            head = self.audit.append(event, **fields)
        except OSError as e:
            self.metrics.audit_write_failures.inc()
            link = fields.get("link", "")
            log.error("audit trail %s: cannot write a %s record%s: %s", self.audit.path,
                      event, f" of link {link}" if link else "", e.strerror or e,
                      extra={"link": link, "event": event})
            if link and event in AUDITED:
                raise LinkFailure(f"audit trail not writable: {e.strerror or e}") from None
            return False
        self.metrics.audit_records.set(head.seq)
        if self.audit.checkpoints != checkpoints:
            self._log_head()
        return True

    def _checkpoint(self) -> None:
        if self.audit is not None:
            self.metrics.audit_records.set(self.audit.checkpoint().seq)
            self._log_head()

    def _log_head(self) -> None:
        """The head of every signed checkpoint goes to the log: shipped off the host, it
        pins the trail (`qkdgw audit verify --head`)."""
        if self.audit is None:
            return
        head = self.audit.head
        log.info("audit checkpoint: seq %d head %s", head.seq, head.hash,
                 extra={"audit_seq": head.seq, "audit_head": head.hash})

    def alarm(self, link: str, a: RaiseAlarm | ClearAlarm) -> None:
        if isinstance(a, RaiseAlarm):
            log.warning("link %s: ALARM %s: %s", link, a.alarm.value, a.detail,
                        extra={"link": link, "alarm": a.alarm.value})
            self.metrics.alarm.labels(link, a.alarm.value).set(1)
        else:
            log.info("link %s: alarm %s cleared", link, a.alarm.value)
            self.metrics.alarm.labels(link, a.alarm.value).set(0)

    def rejected(self, link: str, reason: str, detail: str) -> None:
        """A peer message or channel refused. LINK is one of ours or "" (the peer named an
        unknown one: the detail says which, escaped; the metric label stays bounded)."""
        log.warning("link %s: peer message rejected: %s", link or "-", quote_remote(detail),
                    extra={"link": link, "reason": reason})
        self.metrics.rejected.labels(link or "-", reason).inc()

    async def _flush_state(self) -> None:
        dirty, self.dirty = self.dirty, set()
        states = {link: self.runners[link].machine.snapshot().model_dump_json().encode()
                  for link in dirty}
        failed = await self.state_files.write(states)
        self.dirty |= failed & self.runners.keys()  # (not a link removed meanwhile)

    async def _flush_state_periodically(self) -> None:
        while True:
            await asyncio.sleep(STATE_FLUSH_INTERVAL)
            await self._flush_state()

    def _update_gauges(self) -> None:
        now = time.time()
        for r in self.runners.values():
            m = r.machine
            self.metrics.epoch.labels(r.name).set(m.current_epoch)
            self.metrics.blocked.labels(r.name).set(1 if m.blocked else 0)
            age = now - m.outbound.activated_at if m.outbound else 0.0
            self.metrics.key_age.labels(r.name).set(age)
            self.metrics.hard_lifetime.labels(r.name).set(m.policy.hard_lifetime)
            self.metrics.kms_qber_threshold.labels(r.name).set(m.policy.qber_threshold)
            if m.outbound is not None:
                self.metrics.key_has_qkd.labels(r.name).set(1 if m.outbound.suite.qkd else 0)
            else:
                with contextlib.suppress(KeyError):
                    self.metrics.key_has_qkd.remove(r.name)
            supply = m.supply(now)
            if supply.share is not None:  # (a responder's peer draws its keys)
                self.metrics.qkd_share.labels(r.name).set(supply.share)
            for gauge, value in ((self.metrics.qkd_cadence, supply.qkd_cadence),
                                 (self.metrics.pool_dry_in, supply.pool_dry_in)):
                gauge.labels(r.name).set(math.inf if value is None else value)
        for p in self.channels.channels.values() if self.channels else ():
            self.metrics.channel_up.labels(p.name).set(1 if p.connected else 0)

    # -- status, admin socket, metrics ------------------------------------------------------

    def status(self, link: str | None = None) -> SiteStatus:
        """The site's status; with LINK, only that link's entry (the summary counts all)."""
        now = time.time()
        head = self.audit.head if self.audit else None
        links = [r.status(now) for r in self.runners.values()] \
            if self.role is NodeRole.ACTIVE else \
            [self._standby_link(link) for link in self.config.links]
        x, k = self.exchanges, self.kms_requests
        pacing = PacingStatus(
            exchanges=x.in_flight, exchanges_queued=x.waiting, exchange_limit=x.limit,
            exchange_limit_per_peer=x.per_group, throttled_peers=x.throttled(),
            kms_requests=k.in_flight, kms_requests_queued=k.waiting, kms_request_limit=k.limit,
            kms_keys_waiting=self.key_requests.waiting)
        return SiteStatus(
            site=self.config.site, pid=os.getpid(), uptime=round(now - self.started, 1),
            audit=AuditStatus(path=str(self.config.audit_path),
                              records=head.seq if head else 0,
                              head=head.hash if head else None),
            summary=Summary.of(links, pacing),
            links=[s for s in links if link is None or s.link == link],
            peers=[PeerChannelStatus(peer=p.name, address=str(p.address), connected=p.connected,
                                     connects=p.connects, accepted=self.accepted.get(p.name, 0),
                                     links=len(p.links))
                   for p in (self.channels.channels.values() if self.channels else ())],
            ha=self.ha_status())

    def _unknown_link(self, link: object) -> web.Response:
        """404 naming the link asked for and some that exist (a hub has thousands)."""
        names = [x.name for x in self.config.links]
        shown = ", ".join(names[:LINKS_NAMED]) + \
            (f" and {len(names) - LINKS_NAMED} more" if len(names) > LINKS_NAMED else "")
        return web.json_response({"error": f"no link {link!r} (links: {shown})"}, status=404)

    async def _serve_admin(self) -> None:
        path = self.config.admin_socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        app = web.Application(middlewares=[_owner_only])
        async def status(request: web.Request) -> web.Response:
            link = request.query.get("link")
            if link is not None and link not in {x.name for x in self.config.links}:
                return self._unknown_link(link)
            return web.json_response(self.status(link).model_dump(mode="json"))

        app.router.add_get("/status", status)
        app.router.add_post("/rekey", self._admin_rekey)
        app.router.add_post("/reload", self._admin_reload)
        app.router.add_post("/stop", self._admin_stop)
        app.router.add_get("/ha", self._admin_ha)
        app.router.add_get("/history", self._admin_history)
        Dashboard(self).add_routes(app)  # (`qkdgw demo --web` reads it here)
        app.router.add_post("/ha", self._admin_ha_notify)
        app.router.add_post("/ha/handover", self._admin_handover)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        old = os.umask(0o177)
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._servers.append(runner)

    def _not_in_pair(self) -> web.Response:
        return web.json_response({"error": f"site {self.config.site}: this gateway is not one"
                                  " of a pair (no `ha:` in its configuration)"}, status=409)

    async def _admin_history(self, _: web.Request) -> web.Response:
        """The whole history, as saved (`qkdgw report` reads it from a running daemon)."""
        self._observe()
        return web.Response(body=self.history.dumps(), content_type="application/json")

    async def _admin_ha(self, _: web.Request) -> web.Response:
        status = self.ha_status()
        if status is None:
            return self._not_in_pair()
        return web.json_response(status.model_dump())

    async def _admin_ha_notify(self, request: web.Request) -> web.Response:
        """POST /ha {"args": [TYPE, NAME, STATE, PRIORITY], "keepalived_pid": ...,
        "keepalived_started": ...}: keepalived's notify, as `qkdgw ha notify` passes it."""
        if self.config.ha is None:
            return self._not_in_pair()
        try:
            body = await request.json()
            args, pid, started = body["args"], body.get("keepalived_pid"), \
                body.get("keepalived_started")
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or \
                    not all(v is None or (type(v) is int and v >= 0) for v in (pid, started)):
                raise ValueError("args must be a list of strings, keepalived_pid and"
                                 " keepalived_started counts")
            n = Notification.parse(args, at=time.time(), pid=pid, started=started)
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"error": f"not a keepalived notification: {e}"},
                                     status=400)
        status = await self.notified(n)
        return web.json_response(status.model_dump() if status else {})

    async def _admin_handover(self, _: web.Request) -> web.Response:
        try:
            result = await self.handover()
        except HandoverRefused as e:
            return web.json_response({"error": str(e)}, status=409)
        return web.json_response(result.model_dump())

    async def _admin_rekey(self, request: web.Request) -> web.Response:
        if self.role is NodeRole.STANDBY:
            return web.json_response({"error": f"node {self._node} is standby: it holds no"
                                      " keys; rekey on the active node"}, status=409)
        body = await request.json() if request.can_read_body else {}
        link = body.get("link") if isinstance(body, dict) else None
        if link is not None and link not in self.runners:
            return self._unknown_link(link)
        return web.json_response(Rekeying(rekeying=self.rekey(link)).model_dump())

    async def _admin_reload(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return web.json_response({"error": "the request body is not JSON"}, status=400)
        named = body.get("config") if isinstance(body, dict) else None
        try:
            result = await self.reload(Path(named) if isinstance(named, str) else None)
        except ReloadRefused as e:
            self.metrics.reloads.labels("refused").inc()
            log.error("reload refused: %s", e)
            return web.json_response({"error": str(e)}, status=409)
        return web.json_response(result.model_dump())

    async def _admin_stop(self, _: web.Request) -> web.Response:
        log.info("stop requested on the admin socket")
        self.stop_requested.set()
        return web.json_response(Stopping(stopping=self.config.site).model_dump())

    @property
    def audit_path(self) -> Path:
        return self.config.audit_path

    async def _serve_metrics(self, where: HostPort, tls: MetricsTlsConfig | None) -> None:
        """/metrics, /healthz and the dashboard; with TLS, over HTTPS to clients holding a
        certificate from its CA only."""
        ssl_context = None
        if tls is not None:
            try:
                ssl_context = server_context(tls.ca, tls.cert, tls.key)
            except ConfigError as e:
                raise ConfigError(f"metrics.tls: {e}") from None
            ssl_context.verify_mode = ssl.CERT_REQUIRED
        app = web.Application(middlewares=[security_headers])
        Dashboard(self).add_routes(app)

        async def metrics(_: web.Request) -> web.Response:
            self._update_gauges()
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            if self.role is NodeRole.STANDBY:  # healthy as a standby: nothing to key
                return web.json_response({"status": "standby", "blocked_links": []})
            blocked = [r.name for r in self.runners.values() if r.machine.blocked]
            body = {"status": "blocked" if blocked else "ok", "blocked_links": blocked}
            return web.json_response(body, status=503 if blocked else 200)

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, where.host, where.port, ssl_context=ssl_context).start()
        self._servers.append(runner)
        scheme = "http" if tls is None else "https"
        log.info("metrics on %s://%s/metrics, dashboard on %s://%s/%s", scheme, where, scheme,
                 where, "" if tls is None else " (mutual TLS)")


@web.middleware
async def _owner_only(request: web.Request, handler: Any) -> web.StreamResponse:
    """The admin socket is 0600; also refuse any peer process of another user (not root)."""
    import socket
    import struct

    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            return web.json_response({"error": "not allowed"}, status=403)
    response: web.StreamResponse = await handler(request)
    return response


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Floats to the millisecond (or part per thousand): the status is for people."""
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}


def _shares(drawing: list[tuple[tuple[str, str], LinkRunner]]) -> dict[str, tuple[float, int]]:
    """Each link's fraction of its KME pair's supply, and how many links draw from the pair:
    the initiators (enc_keys) of one pair, each w / max(1, sum of w) by its `qkd_share`
    weight w. DRAWING: each link with its (KME, peer KME), from the status polls."""
    by_pair: dict[tuple[str, str], list[LinkRunner]] = {}
    for pair, runner in drawing:
        if runner.machine.role is Role.INITIATOR:
            by_pair.setdefault(pair, []).append(runner)
    shares = {}
    for runners in by_pair.values():
        total = max(1.0, sum(r.machine.policy.qkd_share for r in runners))
        for r in runners:
            shares[r.name] = (r.machine.policy.qkd_share / total, len(runners))
    return shares


def _describe(e: BaseException) -> str:
    """An exception in one escaped line: its type and message (and its cause's)."""
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if e.__cause__ is not None:
        text += f" ({_describe(e.__cause__)})"
    return quote_remote(text)


def config_problem(e: Exception) -> str:
    """What `qkdgw check-config` says of a file that does not pass (after "qkdgw: ")."""
    if isinstance(e, OSError) and not isinstance(e, ConfigError):
        return f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    return str(e)


def _digests(config: SiteConfig[Any]) -> dict[str, str]:
    """The SHA-256 of each certificate and key file CONFIG names (a reload refuses a new
    one under the same name: it is loaded only at start)."""
    return {name: hashlib.sha256(path.read_bytes()).hexdigest()
            for name, path in tls_files(config).items()}


def _summary(p: Plan) -> str:
    parts = [f"{len(names)} {what} ({', '.join(names)})" if names else f"0 {what}"
             for what, names in (("added", p.added), ("removed", p.removed),
                                 ("changed", [c.name for c in p.changed]))]
    site = f", site: {', '.join(p.site)}" if p.site else ""
    return f"{', '.join(parts)}, {p.unchanged} unchanged{site}"


def _invalid(e: Exception) -> str:
    if isinstance(e, ValidationError):
        first = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        return quote_remote(f"{where}: {first['msg']}")
    return quote_remote(str(getattr(e, "strerror", None) or e))


class LoopWatchdog(threading.Thread):
    """Ends the process when the event loop has not turned for LIMIT seconds: a handler
    that spins or blocks would otherwise hold every link, past any hard lifetime. The
    stacks of all threads go to stderr first, to show where it was stuck."""

    def __init__(self, beat: Any, limit: float = LOOP_STALL_LIMIT) -> None:
        super().__init__(name="loop-watchdog", daemon=True)
        self._beat, self._limit = beat, limit
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(min(1.0, self._limit / 4)):
            stalled = time.monotonic() - self._beat()
            if stalled > self._limit:
                log.critical("event loop stalled for %.1f s: exiting so the data planes'"
                             " own lifetimes take over", stalled)
                faulthandler.dump_traceback(all_threads=True)
                os._exit(EXIT_STALLED)

    def stop(self) -> None:
        self._stop.set()


async def run(config: SiteConfig[Any], *, debug: bool = False,
              source: ConfigFile | None = None, config_sha256: str = "") -> None:
    """Run until `qkdgw stop`, SIGTERM or SIGINT; SIGHUP reloads SOURCE (see Daemon)."""
    daemon = Daemon(config, debug=debug, source=source, config_sha256=config_sha256)
    stop = daemon.stop_requested
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Until the daemon runs, a SIGHUP is noted and refused (never the default: ending it).
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_on_signal)
    try:
        await daemon.start()
    except BaseException:
        await daemon.stop()
        raise
    # (a hub's start reads thousands of state files, with the loop busy and rightly so:
    # the watchdog counts from here)
    daemon.heartbeat = time.monotonic()
    watchdog = LoopWatchdog(lambda: daemon.heartbeat)
    watchdog.start()
    try:
        await stop.wait()
    finally:
        watchdog.stop()
        await daemon.stop()


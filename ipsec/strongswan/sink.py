"""The `strongswan` sink: each epoch's key enters IKEv2 as an RFC 8784 post-quantum preshared
key (PPK), through charon's VICI socket.

    sinks:
      - type: strongswan
        vici: /run/charon.vici          # charon.plugins.vici.socket
        connection:                     # swanctl.conf `connections.<name>`, as YAML
          local_addrs: [192.0.2.1]
          remote_addrs: [198.51.100.1]
          local: {auth: pubkey, certs: [site-a.pem], id: site-a}
          remote: {auth: pubkey, id: site-b}
          children:
            lan: {local_ts: [10.1.0.0/16], remote_ts: [10.2.0.0/16]}

The gateway owns that connection: it loads it (named `qkdgw-LINK` unless `name` says
otherwise) with the epoch's `ppk_id` and `ppk_required = yes`. Per epoch:
- `install_inbound` (both sides, the responder first): the PPK is loaded under an id scoped
  to the link, the epoch and the key's fingerprint, and the connection reloaded with it. A
  responder accepts only the PPK id of its loaded connection, so this precedes the next step.
- `activate_outbound`: the initiator brings up a new IKE SA (IKE_AUTH is where a PPK enters:
  a new IKE SA, never an IKE rekey) and confirms in list-sas that it is established with
  `ppk: yes`; the responder waits to see it. The old IKE SA keeps carrying traffic until then.
- `retire_outbound`: the old IKE SA (and its CHILD SAs) deleted after the grace period.
- `retire_inbound`: the old PPK unloaded.

Failing closed: the IKE SAs never rekey and reauthenticate only after the link's hard
lifetime; the initiator unloads the PPK once its IKE SA is up, so a reauthentication
without a live gateway fails and charon deletes the IKE SA. `block` terminates the link's
IKE SAs and unloads its PPKs. A watchdog reconnects to a restarted charon and re-injects
the current epoch; a restarted gateway adopts the IKE SAs it finds (docs/strongswan.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from vici.protocol import Message

from common.sink import (
    EpochMaterial,
    EpochRef,
    RekeyCause,
    Role,
    SinkConfig,
    SinkContext,
    SinkError,
)
from ipsec.strongswan.hold import HoldConfig, ResponderHold
from ipsec.strongswan.vici import MAX_MESSAGE, Section, Vici, ViciConnectionError, ViciError
from kdf.schedule import Purpose

log = logging.getLogger(__name__)

#: charon deletes an IKE SA this long after the link's hard lifetime would have the core block
#: it (a failed reauthentication, see above): the core's orderly block comes first.
BACKSTOP_SLACK = 5.0
#: IKE_SA_INIT + IKE_AUTH take two round trips and a few ms of CPU; a new IKE SA that is not up
#: after this is a failure (charon retransmits within it: retransmit_timeout defaults to 4 s).
INITIATE_TIMEOUT = 10.0
#: How long a responder waits, once the initiator said it switched, to see the new IKE SA.
ESTABLISHED_WAIT = 5.0
#: How often the watchdog checks charon is there, holds the PPK and (initiator) the IKE SA.
WATCH_INTERVAL = 1.0
#: Keys of a connection that the gateway sets itself: they carry the PPK and the lifetimes.
OWNED_KEYS = ("ppk_id", "ppk_required", "unique", "rekey_time", "reauth_time", "over_time",
              "rand_time")
#: strongSwan learnt RFC 8784 PPKs in 5.7.0.
PPK_SINCE = (5, 7)
#: What operators try before they read RFC 8784: the epoch key as the IKE AUTH secret.
AUTH_PSK_WORDS = ("psk", "auth", "auth-psk", "ike-psk", "secret")
#: Sections in a connection, the connection counting as one: swanctl.conf nests two
#: (connections.<name>.children.<child>); some room for what later versions add.
MAX_CONNECTION_DEPTH = 4
#: VICI prefixes a key with its length in one byte, a value with its length in two.
MAX_VICI_KEY, MAX_VICI_VALUE = 255, 65_535


class StrongswanSinkConfig(SinkConfig):
    type: Literal["strongswan"]
    vici: Path = Field(default=Path("/var/run/charon.vici"),
                       description="charon's VICI socket (charon.plugins.vici.socket)")
    name: str | None = Field(default=None, min_length=1, max_length=64,
                             description="connection name (default: qkdgw-LINK)")
    key_as: Literal["ppk"] = Field(
        default="ppk", description="how the epoch key enters IKEv2: as the RFC 8784 PPK")
    connection: dict[str, Any] = Field(
        description="swanctl.conf connections.<name> as YAML, without the keys the gateway"
                    f" sets ({', '.join(OWNED_KEYS)})")
    hold: HoldConfig | None = Field(
        default_factory=HoldConfig,
        description="kernel-libipsec: hold the IKE responder's tunnel traffic while a new IKE"
                    " SA comes up (ipsec/strongswan/hold.py); null to never hold")

    @field_validator("key_as", mode="before")
    @classmethod
    def _not_auth(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in AUTH_PSK_WORDS:
            raise ValueError(
                "the epoch key cannot be the IKE AUTH preshared key: IKEv2 derives every key"
                " from the Diffie-Hellman exchange and uses the AUTH PSK only to authenticate"
                " it, so a quantum attacker who recorded the exchange reads the traffic"
                " whatever the PSK (RFC 8784, section 1). Use key_as: ppk, which mixes the key"
                " into SK_d and every CHILD SA key")
        return value

    @model_validator(mode="after")
    def _connection(self) -> StrongswanSinkConfig:
        c = self.connection
        owned = sorted(k for k in OWNED_KEYS if k in c)
        if owned:
            raise ValueError(f"connection: {', '.join(owned)} set by the gateway (it loads the"
                             " epoch's PPK id and lifetimes itself): leave them out")
        for key in ("remote_addrs", "local", "remote", "children"):
            if key not in c:
                raise ValueError(f"connection: {key} missing")
        children = c["children"]
        if not isinstance(children, dict) or not children:
            raise ValueError("connection: children must name at least one CHILD SA")
        for child, spec in children.items():
            if not isinstance(spec, dict):
                raise ValueError(f"connection: children.{child} must be a section")
            if "start" in str(spec.get("start_action", "")):
                raise ValueError(
                    f"connection: children.{child}.start_action start would make charon open"
                    " an IKE SA whenever the gateway reloads the connection: the gateway"
                    " initiates (use none, or trap to drop traffic until the SA is up)")
        for local in (k for k in c if k == "local" or k.startswith("local-")):
            if isinstance(c[local], dict) and str(c[local].get("auth", "")).startswith("psk") \
                    and "id" not in c[local]:
                raise ValueError(f"connection: {local}.auth psk needs an id: the operator's"
                                 " own IKE secret, never the epoch key, is found by it")
        _check_values(c, "connection")
        size = len(Message.serialize({"x" * 64: _vici_value(c)}))
        if size > MAX_MESSAGE // 2:  # the gateway adds its own keys, a PPK id, the command
            raise ValueError(f"connection: {size} bytes as a VICI message; charon takes at"
                             f" most {MAX_MESSAGE} in all")
        return self

    def conn_name(self, link: str) -> str:
        return self.name or f"qkdgw-{link}"

    def build(self, context: SinkContext) -> StrongswanSink:
        return StrongswanSink(self, context)


def _check_values(section: Mapping[str, Any], where: str, depth: int = 1) -> None:
    """VICI carries sections, lists of strings and strings, of bounded length: nothing else."""
    if depth > MAX_CONNECTION_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_CONNECTION_DEPTH} sections")
    for key, value in section.items():
        if len(str(key).encode()) > MAX_VICI_KEY:
            raise ValueError(f"{where}: a key longer than {MAX_VICI_KEY} bytes")
        if isinstance(value, dict):
            _check_values(value, f"{where}.{key}", depth + 1)
            continue
        if isinstance(value, list):
            if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{where}.{key}: a list may hold only strings and numbers")
        elif not isinstance(value, str | int | bool):
            raise ValueError(f"{where}.{key}: {type(value).__name__} is not a swanctl value")
        if any(len(str(v).encode()) > MAX_VICI_VALUE
               for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"{where}.{key}: a value longer than {MAX_VICI_VALUE} bytes")


def _vici_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _vici_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_vici_value(v) for v in value]
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def ppk_id(link: str, epoch: int, fingerprint: str) -> str:
    """Unique per link, epoch and key: a state directory started afresh (epoch 1 again) never
    reuses an id for another secret. Both gateways compute the same one."""
    return f"qkdgw-{link}-e{epoch}-{fingerprint[:12]}"


class StrongswanSink:
    def __init__(self, config: StrongswanSinkConfig, context: SinkContext) -> None:
        self.config, self.context = config, context
        self.conn = config.conn_name(context.link)
        self.name = f"strongswan:{self.conn}"
        self.children = list(config.connection["children"])
        lifetimes = context.lifetimes
        self.reauth_after = math.ceil(lifetimes.hard_lifetime + BACKSTOP_SLACK)
        self.vici: Vici | None = None
        self.role: Role | None = None
        #: epoch -> (PPK id, PPK): the live epochs' keys, kept to re-inject after a restart.
        self.ppks: dict[int, tuple[str, bytes]] = {}
        #: PPK ids this sink loaded into the running charon.
        self.loaded: set[str] = set()
        #: epoch -> unique ids of the IKE SAs established under its PPK.
        self.ike: dict[int, set[str]] = {}
        #: IKE SAs found at start: a previous run's, carrying traffic until the first retire.
        self.adopted: set[str] = set()
        self.current: int | None = None  # epoch whose PPK id the loaded connection names
        self.active: int | None = None  # epoch whose IKE SA carries the traffic
        self._lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self._charon_lost_at: float | None = None  # when a VICI session last broke
        self.hold = ResponderHold(context.link, config.hold) if config.hold else None

    # -- the Sink protocol -----------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._adopt()
        except ViciConnectionError as e:
            # charon may start after the gateway: the watchdog keeps trying, and each epoch
            # fails (traffic stays blocked) until it answers.
            log.warning("link %s: strongSwan not reachable yet (%s): will keep trying",
                        self.context.link, e)
        except ViciError as e:
            raise SinkError(f"strongSwan: {e}") from None
        self._watchdog = asyncio.create_task(self._watch(), name=f"vici-{self.context.link}")
        log.info("link %s: strongSwan connection %s via %s", self.context.link, self.conn,
                 self.config.vici)

    async def _adopt(self) -> None:
        """After a restart of the gateway: the IKE SAs of its connection keep carrying traffic
        until the first new epoch replaces them (charon's reauthentication backstop still
        bounds them); PPKs of this link are unloaded (their keys are gone with the old
        process, and none may outlive it)."""
        ours = re.compile(rf"qkdgw-{re.escape(self.context.link)}-e\d+-[0-9a-f]{{12}}$")
        for pid in (await self.vici_request("get-shared")).get("keys", []):
            if ours.match(pid):
                await self.vici_request("unload-shared", {"id": pid}, missing_ok=True)
        self.adopted = {sa["uniqueid"] for sa in await self._ike_sas()
                        if sa.get("state") == "ESTABLISHED"}
        if self.adopted:
            log.info("link %s: adopted IKE SA(s) %s left by a previous run", self.context.link,
                     ",".join(sorted(self.adopted)))

    async def install_inbound(self, material: EpochMaterial) -> None:
        async with self._lock:
            self.role = material.role
            pid = ppk_id(material.link, material.epoch, material.fingerprint)
            self.ppks[material.epoch] = (pid, material.key(Purpose.IKE_PPK))
            try:
                await self._load_ppk(material.epoch)
                await self._load_conn(material.epoch)
            except ViciError as e:
                # Nothing half-done left behind: the connection still names the previous
                # epoch's PPK, which stays loaded.
                with contextlib.suppress(ViciError):
                    await self._unload_ppk(material.epoch)
                self.ppks.pop(material.epoch, None)
                raise SinkError(f"strongSwan: {e}") from None
            self.current = material.epoch
            if material.role is Role.RESPONDER and self.hold is not None:
                # From before the Accept (so before IKE_SA_INIT) until the Commit.
                await self.hold.hold(f"epoch {material.epoch}")

    async def activate_outbound(self, material: EpochMaterial) -> None:
        async with self._lock:
            known = set().union(*self.ike.values())
            try:
                if material.role is Role.INITIATOR:
                    if material.epoch not in self.loaded_epochs():
                        await self._load_ppk(material.epoch)  # e.g. charon restarted since
                    new = await self._initiate(known)
                    await self._unload_ppk(material.epoch)  # see the module docstring
                else:
                    if self.hold is not None:  # the initiator's CHILD SAs are installed
                        await self.hold.release("Commit")
                    new = await self._await_new(known, ESTABLISHED_WAIT)
            except ViciError as e:
                raise SinkError(f"strongSwan: {e}") from None
            self.ike[material.epoch] = new
            self.active = material.epoch
        log.info("link %s: epoch %d: IKE SA %s established with PPK %s", material.link,
                 material.epoch, ",".join(sorted(new)), self.ppks[material.epoch][0])

    async def retire_outbound(self, ref: EpochRef) -> None:
        async with self._lock:
            uids = self.ike.pop(ref.epoch, set())
            if ref.epoch == self.active:
                self.active = None
            elif self.active is not None:  # a newer epoch's IKE SA is up: the previous
                uids |= self.adopted          # run's are not needed any more
                self.adopted = set()
            try:
                await self._terminate([sa for sa in await self._ike_sas()
                                       if sa["uniqueid"] in uids], f"epoch {ref.epoch} retired")
            except ViciError as e:
                raise SinkError(f"strongSwan: {e}") from None

    async def retire_inbound(self, ref: EpochRef) -> None:
        async with self._lock:
            try:
                await self._unload_ppk(ref.epoch)
            except ViciError as e:
                raise SinkError(f"strongSwan: {e}") from None
            self.ppks.pop(ref.epoch, None)

    async def block(self, link: str, reason: str) -> None:
        if self.hold is not None:
            await self.hold.release("blocked")
        async with self._lock:
            try:
                await self._terminate(await self._ike_sas(), f"blocked: {reason}")
                for epoch in list(self.ppks):
                    await self._unload_ppk(epoch)
            except ViciError as e:
                raise SinkError(f"strongSwan: {e}") from None
            self.ppks.clear()
            self.ike.clear()
            self.adopted = set()
            self.active = None

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        try:
            await self.block(self.context.link, "the gateway stops")
            await self.vici_request("unload-conn", {"name": self.conn}, missing_ok=True)
        except (SinkError, ViciError) as e:
            log.error("link %s: strongSwan cleanup incomplete: %s", self.context.link, e)
        finally:
            if self.hold is not None:
                await self.hold.close()
            if self.vici is not None:
                await self.vici.close()
                self.vici = None
        log.info("link %s: strongSwan IKE SAs terminated, PPKs and connection %s unloaded",
                 self.context.link, self.conn)

    async def remove(self) -> None:
        """As on stop: IKE SAs terminated, PPKs and the connection unloaded; no file."""
        await self.close()

    # -- VICI --------------------------------------------------------------------------------

    async def _session(self) -> Vici:
        if self.vici is None:
            vici = await Vici.connect(self.config.vici)
            try:
                version = (await vici.request("version")).get("version", "?")
                if not isinstance(version, str):
                    raise ViciError("VICI version: charon's version is not text")
            except ViciError:
                await vici.close()
                raise
            if _version(version) < PPK_SINCE:
                await vici.close()
                raise ViciError(f"charon {version} has no RFC 8784 PPK support (strongSwan"
                                f" {'.'.join(map(str, PPK_SINCE))} or later)")
            log.info("link %s: charon %s at %s", self.context.link, version, self.config.vici)
            self.vici = vici
        return self.vici

    async def _call(self, run: Callable[[Vici], Any]) -> Any:
        """One VICI call; a lost session is dropped so the next call reconnects."""
        try:
            return await run(await self._session())
        except ViciConnectionError as e:
            if self.vici is not None:
                await self.vici.close()
                self.vici = None
            # A new charon holds nothing this sink loaded, and numbers its SAs from 1 again.
            self.loaded.clear()
            self.ike = {epoch: set() for epoch in self.ike}
            self.adopted = set()
            if self._charon_lost_at is None:
                self._charon_lost_at = time.monotonic()
                log.error("link %s: strongSwan: %s", self.context.link, e)
            raise

    async def vici_request(self, command: str, message: Mapping[str, Any] | None = None, *,
                           missing_ok: bool = False, timeout: float = 10.0) -> Section:
        try:
            result: Section = await self._call(
                lambda v: v.request(command, message, timeout=timeout))
        except ViciConnectionError:
            raise
        except ViciError as e:
            # What charon 5.9/6.0 say for a connection or SA that is not there (any more).
            if missing_ok and ("not found" in str(e) or "no matching" in str(e)):
                return {}
            raise
        return result

    async def _ike_sas(self) -> list[Section]:
        """This connection's IKE SAs, each with its name, state, uniqueid, ppk flag."""
        events: list[Section] = await self._call(
            lambda v: v.streamed("list-sas", "list-sa", {"ike": self.conn, "noblock": "yes"}))
        out = []
        for event in events:
            for name, sa in event.items():
                if name == self.conn and isinstance(sa, dict):
                    if not isinstance(sa.get("uniqueid"), str) \
                            or not isinstance(sa.get("child-sas", {}), dict):
                        raise ViciError(f"list-sas: an IKE SA of {self.conn} without a uniqueid"
                                        " or with child-sas not a section")
                    out.append(sa)
        return out

    def loaded_epochs(self) -> set[int]:
        return {e for e, (pid, _) in self.ppks.items() if pid in self.loaded}

    async def _load_ppk(self, epoch: int) -> None:
        pid, secret = self.ppks[epoch]
        await self.vici_request("load-shared", {"id": pid, "type": "PPK", "data": secret,
                                                "owners": [pid]})
        self.loaded.add(pid)

    async def _unload_ppk(self, epoch: int) -> None:
        if epoch not in self.ppks:
            return
        pid = self.ppks[epoch][0]
        if pid in self.loaded:
            await self.vici_request("unload-shared", {"id": pid}, missing_ok=True)
            self.loaded.discard(pid)

    async def _load_conn(self, epoch: int) -> None:
        conn = _vici_value(copy.deepcopy(self.config.connection))
        conn.update(ppk_id=self.ppks[epoch][0], ppk_required="yes",
                    # Never replaced by INITIAL_CONTACT: make-before-break needs two at once.
                    unique="never",
                    # A PPK only enters at IKE_AUTH: an IKE rekey would extend the epoch's key
                    # past its lifetime. Reauthentication is the backstop (module docstring).
                    rekey_time="0", reauth_time=f"{self.reauth_after}s", over_time="2s",
                    rand_time="0")
        await self.vici_request("load-conn", {self.conn: conn})

    async def _initiate(self, known: set[str]) -> set[str]:
        """A new IKE SA with every CHILD SA of the connection; its unique id(s)."""
        deadline = time.monotonic() + INITIATE_TIMEOUT
        for child in self.children:
            remaining = max(deadline - time.monotonic(), 0.5)
            await self.vici_request("initiate", {
                "ike": self.conn, "child": child, "timeout": int(remaining * 1000),
                "init-limits": "no"}, timeout=remaining + 1.0)
        return await self._await_new(known, max(deadline - time.monotonic(), 0.5))

    async def _await_new(self, known: set[str], wait: float) -> set[str]:
        """Poll list-sas until an IKE SA not seen before is ESTABLISHED with `ppk: yes` and all
        CHILD SAs INSTALLED: never assume charon did what it was asked."""
        deadline = time.monotonic() + wait
        while True:
            sas = await self._ike_sas()
            new = {sa["uniqueid"] for sa in sas if sa["uniqueid"] not in known
                   and sa.get("state") == "ESTABLISHED" and sa.get("ppk") == "yes"
                   and _children_up(sa, self.children)}
            if new:
                return new
            if time.monotonic() >= deadline:
                seen = ", ".join(f"{sa['uniqueid']}:{sa.get('state')} ppk={sa.get('ppk', 'no')}"
                                 for sa in sas if sa["uniqueid"] not in known) or "none"
                raise ViciError(f"no new IKE SA of {self.conn} established with a PPK after"
                                f" {wait:.1f} s (new IKE SAs: {seen})")
            await asyncio.sleep(0.01)

    async def _terminate(self, sas: list[Section], why: str) -> None:
        for sa in sas:
            with contextlib.suppress(ViciConnectionError):
                # force: no waiting for the peer's DELETE response (it may be gone).
                await self.vici_request("terminate", {"ike-id": sa["uniqueid"], "force": "yes",
                                                      "timeout": "-1"}, missing_ok=True)
            log.info("link %s: IKE SA %s terminated (%s)", self.context.link, sa["uniqueid"],
                     why)

    # -- watchdog ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Notice a restarted charon (socket gone, PPK or connection or IKE SA gone) and bring
        the current epoch back; nothing is assumed from before the restart."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            async with self._lock:
                try:
                    await self._check()
                except ViciConnectionError:
                    pass  # logged once when it broke; tried again next time
                except ViciError as e:
                    log.error("link %s: strongSwan: %s", self.context.link, e)

    async def _check(self) -> None:
        await self._call(lambda v: v.request("get-conns"))  # reconnects to a new charon
        if self._charon_lost_at is not None:
            log.warning("link %s: charon is back after %.1f s: restoring epoch %s",
                        self.context.link, time.monotonic() - self._charon_lost_at,
                        self.active)
            self._charon_lost_at = None
            if self.role is Role.RESPONDER and self.active is not None:
                # The initiator's charon would notice only by dead peer detection: a new
                # epoch now is faster (the core asks the initiator for it).
                self.context.events.rekey_needed(
                    self.context.link, RekeyCause.PLANE_RESTARTED,
                    "charon restarted: its IKE SAs are gone")
        if self.current is None:
            return
        shared = (await self.vici_request("get-shared")).get("keys", [])
        conns = (await self.vici_request("get-conns")).get("conns", [])
        pid = self.ppks[self.current][0] if self.current in self.ppks else None
        need_ppk = self.role is Role.RESPONDER or self.active != self.current
        if pid is not None and need_ppk and pid not in shared:
            log.warning("link %s: PPK %s missing in charon (restart or --load-creds):"
                        " loading it again", self.context.link, pid)
            await self._load_ppk(self.current)
        if self.conn not in conns and pid is not None:
            log.warning("link %s: connection %s missing in charon: loading it again",
                        self.context.link, self.conn)
            await self._load_conn(self.current)
        if self.role is Role.INITIATOR and self.active is not None \
                and self.active == self.current and self.active in self.ppks:
            sas = await self._ike_sas()
            if not any(sa.get("state") == "ESTABLISHED" for sa in sas):
                log.warning("link %s: no IKE SA up: re-establishing epoch %d",
                            self.context.link, self.active)
                await self._load_ppk(self.active)
                try:
                    new = await self._initiate({sa["uniqueid"] for sa in sas})
                finally:
                    await self._unload_ppk(self.active)
                self.ike.setdefault(self.active, set()).update(new)
                log.info("link %s: epoch %d: IKE SA %s re-established with PPK %s",
                         self.context.link, self.active, ",".join(sorted(new)),
                         self.ppks[self.active][0])


def _version(text: str) -> tuple[int, ...]:
    """'5.9.8' or '6.0.1dr1' -> (5, 9, 8) / (6, 0, 1); unreadable -> (0,)."""
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


def _children_up(sa: Section, children: list[str]) -> bool:
    states = {c.get("name"): c.get("state") for c in (sa.get("child-sas") or {}).values()
              if isinstance(c, dict)}
    return all(states.get(name) == "INSTALLED" for name in children)

"""Every interleaving of two real rekey cores, up to a bound (docs/protocol.md, "Exhaustive
exploration").

    python -m tests.gateway.explore            # the CI bound
    python -m tests.gateway.explore --soak     # the soak bound
    python -m tests.gateway.explore --help     # the bounds, and how to set each

The world: an initiator's and a responder's `LinkMachine` (the real ones, with their real
key schedule; only the ML-KEM and X25519 primitives and the randomness are deterministic
stand-ins, so that two paths to the same state meet), a network of messages in flight, a KME
pair handing out QKD keys from a finite pool, each side's sinks and state file, and a clock
that jumps to the next deadline of either side. From each state every one of these may
happen next:

- a message in flight is delivered (any of them: reordering), lost or duplicated;
- a KMS request is answered, fails, answers with a key the responder's KME corrupted, or
  (enc_keys) hands out a key it handed out before (a KME restored from a backup);
- the oldest sink call of a side (install, activate, retire, block: the daemon awaits them
  in turn) succeeds or fails;
- a side restarts from its last state file (also midway through a sink call: its effect
  done, its answer lost), or without one;
- time jumps to the next deadline of either side (messages may stay in flight: delay is
  free); over KMS requests or sink calls still in progress, that is a slow KMS or sink: a
  fault.

Faults are counted; losing a state file and a KME replay are the drastic ones, at most one
per path (together they defeat any defence: nothing is left that remembers the key IDs).
The search starts from a cold start (neither side has a key) and from a running link
(epoch 1 in place on both sides), so that the depth bound reaches a rekey.

Every distinct state (both cores, the world, the history the rules need: hashed in a
canonical form, with times relative to now) is explored once, breadth-first. Safety: the
rules of tests/gateway/invariants.py (shared with the property tests) hold after every step,
the cores raise nothing (TransitionError: the transition table holds) and no Tick leaves a
deadline due (the daemon would spin). Liveness, on the explored graph: from every state, the
fault-free continuation (sink calls and KMS requests answered, every message delivered, then
time moves on) reaches both sides sending on one common epoch newer than any either sent on.

Output: the figures, the shortest trace of a violation as a message sequence chart, and as
the last line one JSON object; exit status 0 only without violations.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
import uuid
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, is_dataclass, replace
from enum import Enum
from typing import Any, NamedTuple, TypeAlias
from unittest import mock

from pydantic import BaseModel

from common.sink import EpochMaterial, EpochRef, Role
from gateway.core import initiator, responder
from gateway.core.events import (
    Action,
    ActivateFailed,
    ActivateOutbound,
    Block,
    BlockFailed,
    Event,
    FetchQkdKeys,
    FetchQkdKeysById,
    InstallFailed,
    InstallInbound,
    KmsStatusObserved,
    Persist,
    QkdFetchFailed,
    QkdKeysFetched,
    RetireFailed,
    RetireInbound,
    RetireOutbound,
    Send,
    SinkActivated,
    SinkInstalled,
    Tick,
    received,
)
from gateway.core.machine import LinkMachine, PeerMessageRejected
from gateway.core.messages import Abort, Accept, Ack, Commit, Message, Offer, RekeyRequest, decode
from gateway.core.messages import Suite as MessageSuite
from gateway.core.messages import encode as encode_message
from gateway.core.policy import Mode, Policy
from gateway.core.snapshot import Snapshot
from kdf import Encapsulation, EpochKeys, InvalidKeyError, Kem, KemPrivateKey, Party, Transcript
from kdf.errors import KdfError
from kms.models import QkdKey
from tests.gateway import invariants
from tests.gateway.invariants import DataPlane, Ledger
from tests.gateway.world import CERT_I, CERT_R, identity

# -- stand-ins: what keeps the state space finite without touching the core's code paths --------


def _h(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=64).digest()


class StandInKem(Kem):
    """ML-KEM-768 as the core sees it (name, sizes checked, implicit rejection), made of
    hashes: deterministic, and the size of an X25519 key rather than 1 KiB."""

    name = "ML-KEM-768"
    backend = "explorer"
    encapsulation_key_size = 32
    ciphertext_size = 32

    def generate(self) -> KemPrivateKey:
        raise KdfError("the explorer's KEM keys come from the core's rng (from_seed)")

    def from_seed(self, seed: bytes) -> KemPrivateKey:
        return StandInKemKey(self, seed)

    def _encapsulate(self, encapsulation_key: bytes) -> Encapsulation:
        ct = _h("ct", encapsulation_key)[:32]
        return Encapsulation(ct, _h("ss", encapsulation_key, ct)[:32])


class StandInKemKey(KemPrivateKey):
    def __init__(self, kem: Kem, seed: bytes) -> None:
        self.kem = kem
        self.seed = seed

    @property
    def encapsulation_key(self) -> bytes:
        return _h("ek", self.seed)[:32]

    def _decapsulate(self, ciphertext: bytes) -> bytes:
        # Another ciphertext than the one made for this key: another secret (implicit
        # rejection), and the key confirmation fails, as with ML-KEM.
        return _h("ss", self.encapsulation_key, ciphertext)[:32]


class StandInX25519:
    """X25519 as the core sees it (32-byte keys, the all-zero point refused), made of a
    hash of the two public keys."""

    def __init__(self, private: bytes) -> None:
        self.private = private

    @classmethod
    def from_private_bytes(cls, data: bytes) -> StandInX25519:
        return cls(data)

    @property
    def public_key(self) -> bytes:
        return _h("pk", self.private)[:32]

    def exchange(self, peer_public_key: bytes) -> bytes:
        if len(peer_public_key) != 32:
            raise InvalidKeyError("X25519 public key must be 32 bytes")
        if peer_public_key == bytes(32):
            raise InvalidKeyError("X25519 public key is of low order (all-zero shared secret)")
        return _h("dh", *sorted((self.public_key, peer_public_key)))[:32]


class CountingRng:
    """The core's randomness: a hash of (side, process, the highest epoch number it has
    seen, draws since). Fresh on every draw along a path; the same on two paths that reached
    the same state, so that their states compare equal."""

    def __init__(self, side: str, process: int) -> None:
        self.side, self.process = side, process
        self.epoch = self.drawn = 0

    def sync(self, max_epoch: int) -> None:
        """Before each event: a higher epoch number starts a new count."""
        if max_epoch > self.epoch:
            self.epoch, self.drawn = max_epoch, 0

    def __call__(self, n: int) -> bytes:
        self.drawn += 1
        return _h(self.side, self.process, self.epoch, self.drawn)[:n]


KEM = StandInKem()


@contextmanager
def stand_ins() -> Iterator[None]:
    """X25519 as the handlers import it, replaced while the explorer runs."""
    with ExitStack() as stack:
        for module in (initiator, responder):
            stack.enter_context(mock.patch.object(module, "X25519PrivateKey", StandInX25519))
        yield


def key_id(n: int) -> str:
    """The pool's key IDs: UUIDs 1, 2, 3, ..."""
    return str(uuid.UUID(int=n + 1))


def _key(n: int, corrupt: bool = False) -> QkdKey:
    return QkdKey(key_id(n), _h("corrupted" if corrupt else "qkd", n)[:32])


# -- bounds and policy ---------------------------------------------------------------------------

#: Short, binary-exact timers (sums of them stay exact, so equal times compare equal): a rekey
#: every 4 s, keys for 4.5 s (one failed attempt and the link blocks), an exchange given up
#: after 3 s, retransmissions after 1 and 2 s.
POLICY = Policy(interval=4.0, jitter=0.0, hard_lifetime=4.5, grace=1.0, retransmit=1.0,
                retransmit_max=2.0, attempt_timeout=3.0, retry_backoff=1.0,
                retry_backoff_max=2.0)


@dataclass(frozen=True)
class Bounds:
    #: Faults happen while no epoch number above this is in use; fault-free, the world goes
    #: on SLACK numbers more (what the liveness check follows).
    epochs: int
    #: Faults on one path.
    faults: int
    #: Steps on one path with faults allowed; deeper, only the fault-free continuation.
    depth: int
    slack: int = 3
    mode: Mode = Mode.QKD_PQC


#: Steps the fault-free continuation of a cold start may take to a running link (about 20).
ROOT_STEPS = 200

CI = Bounds(epochs=2, faults=1, depth=14)
SOAK = Bounds(epochs=2, faults=2, depth=12)


# -- states ---------------------------------------------------------------------------------------

Call: TypeAlias = (FetchQkdKeys | FetchQkdKeysById | InstallInbound | ActivateOutbound
                   | RetireInbound | RetireOutbound | Block)


@dataclass(frozen=True)
class Pending:
    """A KMS request or a sink call in progress; LATE: time has moved on since."""

    call: Call
    late: bool = False


@dataclass(frozen=True)
class Half:
    """One side: its core and rng (never changed once here: a step changes copies), data
    plane, calls in progress, state file; and what the explorer reads often, kept at hand."""

    core: LinkMachine
    rng: CountingRng
    plane: DataPlane
    sink: tuple[Pending, ...]
    kms: tuple[Pending, ...]
    snapshot: Snapshot | None
    deadline: float | None
    max_epoch: int
    key: int  # hash of its canonical form, times relative to `at`
    at: float


class Wire(NamedTuple):
    """A message in flight: to whom, its epoch (the order it is delivered in when faults
    stop), its bytes."""

    to: str
    epoch: int
    raw: bytes


@dataclass(frozen=True)
class Node:
    now: float
    i: Half
    r: Half
    net: tuple[Wire, ...]  # sorted; at most two copies of one message (see `Step.send`)
    issued: int  # keys the KME pair handed out: key_id(0 .. issued-1)
    reserved: frozenset[int]  # handed to I, not yet fetched by R
    ledger: Ledger
    faults: int
    drastic: bool
    key: int

    def half(self, name: str) -> Half:
        return self.i if name == "I" else self.r

    @property
    def max_epoch(self) -> int:
        return max(self.i.max_epoch, self.r.max_epoch)


# -- the canonical form -------------------------------------------------------------------------

#: Absolute times in the core's state: relative to now in the canonical form.
_TIMES = frozenset({"started", "resumed", "next_send", "next_rekey_at", "next_nudge_at",
                    "reblock_at", "retire_at", "activated_at", "credit_at"})
#: Times the core only compares with `now >=`: every past value is the same.
_PASSED = frozenset({"failed_until", "refused_until"})
#: Not state: constants of the link, metrics, what is a function of the rest (`_persisted`
#: equals the state key after every event), the KMS's pool trend (read only without a
#: key_rate, which every status here gives), the request counter (requests are renamed).
_NOT_STATE = frozenset({"identity", "policy", "kem", "check_transitions", "_rng", "rekeys",
                        "consumed", "samples", "_persisted", "_request"})
#: Frozen values without a clock in them: hashed as they are.
_VALUES = (Offer, Accept, Commit, Ack, Abort, RekeyRequest, EpochMaterial, EpochKeys,
           Transcript, Party, QkdKey, EpochRef, MessageSuite)

_ATOM, _SEQ, _MAP, _ORDERED, _OBJECT = range(5)
_KINDS: dict[type, int] = {int: _ATOM, float: _ATOM, str: _ATOM, bytes: _ATOM, bool: _ATOM,
                           type(None): _ATOM, tuple: _SEQ, list: _SEQ, deque: _SEQ,
                           dict: _MAP, OrderedDict: _ORDERED}
_TIME, _PASS, _REQUEST, _DEEP = range(4)
#: (type, its instance's attribute names) -> (plan number, (name, how) sorted, not-state left
#: out): one walk of an object's attributes, worked out once.
_PLANS: dict[tuple[type, tuple[str, ...]], tuple[int, tuple[tuple[str, int], ...]]] = {}


def _kind(t: type) -> int:
    kind = _KINDS.get(t)
    if kind is None:
        kind = _ATOM if issubclass(t, (Enum, *_VALUES)) else _OBJECT
        _KINDS[t] = kind
    return kind


def _plan(t: type, names: tuple[str, ...]) -> tuple[int, tuple[tuple[str, int], ...]]:
    plan = _PLANS.get((t, names))
    if plan is None:
        how = [(n, _TIME if n in _TIMES else _PASS if n in _PASSED else
                _REQUEST if n == "request" else _DEEP) for n in sorted(names)
               if n not in _NOT_STATE]
        plan = _PLANS[(t, names)] = (len(_PLANS), tuple(how))
    return plan


def canon(x: Any, now: float, requests: dict[int, int]) -> Hashable:
    """X in a form equal for equivalent states: times relative to NOW, request numbers by
    first appearance (REQUESTS), dicts sorted, what is not state left out."""
    kind = _kind(type(x))
    if kind == _ATOM:
        return x  # type: ignore[no-any-return]
    atom = _KINDS.get
    if kind == _SEQ:
        return tuple(v if atom(type(v)) == _ATOM else canon(v, now, requests) for v in x)
    if kind == _MAP:
        return tuple(sorted((k, v if atom(type(v)) == _ATOM else canon(v, now, requests))
                            for k, v in x.items()))
    if kind == _ORDERED:
        return tuple((k, v if atom(type(v)) == _ATOM else canon(v, now, requests))
                     for k, v in x.items())
    d = x.__dict__
    number, plan = _plan(type(x), tuple(d))
    fields: list[Hashable] = [number]
    for name, how in plan:
        value = d[name]
        if value is None or (how == _DEEP and _KINDS.get(type(value)) == _ATOM):
            fields.append(value)
        elif how == _TIME:
            fields.append(value - now)
        elif how == _PASS:
            fields.append(max(value - now, 0.0))
        elif how == _REQUEST:
            fields.append(requests.setdefault(value, len(requests)))
        else:
            fields.append(canon(value, now, requests))
    return tuple(fields)


#: The explorer's own stand-ins, immutable by construction.
_IMMUTABLE = {StandInKem, StandInKemKey, StandInX25519}
_SHARED: dict[type, bool] = {}


def _shared(t: type) -> bool:
    """T's values never change: a copy of a state may share them."""
    shared = _SHARED.get(t)
    if shared is None:
        shared = _kind(t) == _ATOM or t in _IMMUTABLE \
            or (is_dataclass(t) and t.__dataclass_params__.frozen)  # type: ignore[attr-defined]
        shared = shared or (issubclass(t, BaseModel) and bool(t.model_config.get("frozen")))
        _SHARED[t] = shared
    return shared


def clone(x: Any, memo: dict[int, Any]) -> Any:
    """A copy of X to change, sharing what cannot change (frozen values: messages, keys,
    transcripts) with it: what copy.deepcopy does, at a fraction of the cost."""
    t = type(x)
    if _shared(t):
        return x
    if t is list:
        return [clone(v, memo) for v in x]
    if t is tuple:
        shared = _SHARED.get
        return x if all(shared(type(v)) for v in x) else tuple(clone(v, memo) for v in x)
    if t is dict:
        return {k: clone(v, memo) for k, v in x.items()}
    if t is OrderedDict:
        return OrderedDict((k, clone(v, memo)) for k, v in x.items())
    if t is deque:
        return deque(clone(v, memo) for v in x)
    copy = memo.get(id(x))
    if copy is None:
        copy = memo[id(x)] = object.__new__(t)
        copy.__dict__.update({k: v if _SHARED.get(type(v)) else clone(v, memo)
                              for k, v in x.__dict__.items()})
    return copy


def _plane_canon(p: DataPlane, now: float) -> Hashable:
    return (tuple(sorted(p.inbound.items())), p.outbound, p.outbound_key, p.blocked,
            p.block_refused, p.blocking, tuple(p.sent_on), tuple(sorted((e, t - now) for e, t in
                                                            p.asked.items())),
            tuple(sorted((e, t - now) for e, t in p.left.items())))


def _call_canon(p: Pending, requests: dict[int, int]) -> Hashable:
    c = p.call
    if isinstance(c, FetchQkdKeys | FetchQkdKeysById):
        return (type(c).__name__, requests.setdefault(c.request, len(requests)),
                getattr(c, "key_ids", ()), p.late)
    return (c, p.late)


def half_key(m: LinkMachine, rng: CountingRng, plane: DataPlane, sink: tuple[Pending, ...],
             kms: tuple[Pending, ...], snapshot: Snapshot | None, now: float) -> int:
    requests: dict[int, int] = {}
    core = canon(m, now, requests)
    return hash((core, rng.process, rng.epoch, rng.drawn, _plane_canon(plane, now),
                 tuple(_call_canon(p, requests) for p in kms),
                 tuple(_call_canon(p, requests) for p in sink),
                 None if snapshot is None else canon(snapshot, now, {})))


def _ledger_canon(ledger: Ledger) -> Hashable:
    return (tuple(sorted(ledger.keys.items())), tuple(sorted(ledger.key_ids.items())),
            ledger.offered)


# -- one step ------------------------------------------------------------------------------------


class Move(NamedTuple):
    """What can happen next: KIND on SIDE (or the network), ARG which one."""

    kind: str
    side: str = ""
    arg: int = 0
    fault: bool = False


class Line(NamedTuple):
    """One line of a message sequence chart: I | network | R."""

    now: float
    i: str
    net: str
    r: str


def _short(message: Message) -> str:
    return f"{type(message).__name__} e{message.epoch}"


def _summary(actions: list[Action]) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, Send):
            out.append(f"send {_short(a.message)}")
        elif isinstance(a, InstallInbound):
            out.append(f"install in e{a.material.epoch}")
        elif isinstance(a, ActivateOutbound):
            out.append(f"switch out e{a.material.epoch}")
        elif isinstance(a, RetireInbound | RetireOutbound):
            out.append(f"retire {'out' if isinstance(a, RetireOutbound) else 'in'}"
                       f" e{a.ref.epoch}")
        elif isinstance(a, Block):
            out.append("block")
        elif isinstance(a, FetchQkdKeys):
            out.append("enc_keys")
        elif isinstance(a, FetchQkdKeysById):
            out.append("dec_keys")
    return out


def _call_name(c: Call) -> str:
    actions: list[Action] = [c]
    return _summary(actions)[0]


class Build:
    """One side, being changed by a step (copies made as needed)."""

    def __init__(self, half: Half, name: str) -> None:
        self.half, self.name = half, name
        self.m: LinkMachine | None = None
        self.rng: CountingRng | None = None
        self.changed = False  # the core was fed or replaced
        self.plane = half.plane
        self.plane_own = False
        self.sink = list(half.sink)
        self.kms = list(half.kms)
        self.snapshot = half.snapshot
        self.touched = False  # anything of the side's changed

    def load(self) -> tuple[LinkMachine, CountingRng]:
        """The core and rng, to change."""
        if self.m is None or self.rng is None:
            memo: dict[int, Any] = {}
            self.m, self.rng = clone(self.half.core, memo), clone(self.half.rng, memo)
        return self.m, self.rng

    def own_plane(self) -> DataPlane:
        if not self.plane_own:
            self.plane, self.plane_own = self.plane.copy(), True
        self.touched = True
        return self.plane

    def freeze(self, now: float, grace: float) -> Half:
        plane = self.plane.pruned(now, grace)
        if not self.touched and plane is self.half.plane and now == self.half.at:
            return self.half
        m, rng = self.load() if self.changed else (self.half.core, self.half.rng)
        sink, kms = tuple(self.sink), tuple(self.kms)
        return Half(m, rng, plane, sink, kms, self.snapshot, m.next_deadline(), m.max_epoch,
                    half_key(m, rng, plane, sink, kms, self.snapshot, now), now)


class Step:
    """One transition from a node, under construction."""

    def __init__(self, x: Explorer, s: Node) -> None:
        self.x, self.s = x, s
        self.now = s.now
        self.sides = {"I": Build(s.i, "I"), "R": Build(s.r, "R")}
        self.net = s.net
        self.issued, self.reserved = s.issued, s.reserved
        self.ledger, self.ledger_own = s.ledger, False
        self.faults, self.drastic = s.faults, s.drastic
        self.bad: list[str] = []
        self.text = {"I": "", "N": "", "R": ""}

    def say(self, column: str, text: str) -> None:
        self.text[column] = f"{self.text[column]}; {text}" if self.text[column] else text

    def own_ledger(self) -> Ledger:
        if not self.ledger_own:
            self.ledger, self.ledger_own = self.ledger.copy(), True
        return self.ledger

    # -- the core ---------------------------------------------------------------------------------

    def feed(self, b: Build, event: Event, what: str) -> None:
        m, rng = b.load()
        b.changed = b.touched = True
        rng.sync(m.max_epoch)
        before = m.state
        try:
            actions = m.handle(event, self.now)
        except PeerMessageRejected as e:
            self.say(b.name, f"{what}: refused ({e.reason})")
            return
        except Exception as e:  # a CoreError (TransitionError: rule 7) or any other: a bug
            self.bad.append(f"{b.name} raised {type(e).__name__}: {e}")
            self.say(b.name, f"{what}: {type(e).__name__}")
            return
        moved = f"{before.value}→{m.state.value}" if m.state is not before else before.value
        self.say(b.name, "; ".join([f"{what}: {moved}", *_summary(actions)]))
        self.execute(b, actions)

    def execute(self, b: Build, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.send(b.name, a.message)
            elif isinstance(a, FetchQkdKeys | FetchQkdKeysById):
                b.kms.append(Pending(a))
                b.touched = True
            elif isinstance(a, ActivateOutbound):
                b.own_plane().ask(a.material.epoch, self.now)
                b.sink.append(Pending(a))
            elif isinstance(a, Block):
                b.own_plane().ask_block(self.now)
                b.sink.append(Pending(a))
            elif isinstance(a, InstallInbound | RetireInbound | RetireOutbound):
                b.sink.append(Pending(a))
                b.touched = True
            elif isinstance(a, Persist):
                try:
                    b.snapshot = b.load()[0].snapshot()
                except Exception as e:  # (pydantic's ValidationError: a state file it refuses)
                    self.bad.append(f"{b.name} could not save its state: {e}")
                b.touched = True

    def send(self, sender: str, message: Message) -> None:
        if isinstance(message, Offer) and sender == "I":
            self.bad += self.own_ledger().offer(message.epoch, message.nonce)
        w = Wire("R" if sender == "I" else "I", message.epoch, encode_message(message))
        # A third identical copy in flight is one of the two (a saturating multiset): the
        # cores answer repeats alike, and counting copies would multiply the states.
        if self.net.count(w) < 2:
            self.net = tuple(sorted((*self.net, w)))

    # -- the moves --------------------------------------------------------------------------------

    def deliver(self, w: Wire) -> None:
        self.drop(w)
        message = self.x.decoded(w.raw)
        self.say("N", f"{_short(message)} {'──→' if w.to == 'R' else '←──'}")
        event = received(message, CERT_I if w.to == "R" else CERT_R)
        self.feed(self.sides[w.to], event, _short(message))

    def drop(self, w: Wire) -> None:
        net = list(self.net)
        net.remove(w)
        self.net = tuple(net)

    def lose(self, w: Wire) -> None:
        self.drop(w)
        self.say("N", f"{_short(self.x.decoded(w.raw))} lost")

    def duplicate(self, w: Wire) -> None:
        self.net = tuple(sorted((*self.net, w)))
        self.say("N", f"{_short(self.x.decoded(w.raw))} duplicated")

    def kms(self, b: Build, j: int, how: str) -> None:
        """A KMS request ends: HOW "ok", "fail", "corrupt" (the responder's KME hands out
        other bytes under the key's ID) or "replay" (the KME hands out key 0 again)."""
        call = b.kms.pop(j).call
        assert isinstance(call, FetchQkdKeys | FetchQkdKeysById)
        b.touched = True
        if how == "fail":
            self.feed(b, QkdFetchFailed(call.request, "KME unavailable"), "KME: fails")
        elif isinstance(call, FetchQkdKeys):
            keys: tuple[QkdKey, ...]
            if how == "replay":
                keys, self.reserved = (_key(0),), self.reserved | {0}
                self.drastic = True
            else:
                keys = tuple(_key(n) for n in range(self.issued, self.issued + call.number))
                self.reserved |= set(range(self.issued, self.issued + call.number))
                self.issued += call.number
            self.feed(b, QkdKeysFetched(call.request, keys),
                      f"KME: {'replays ' if how == 'replay' else ''}key"
                      f" {','.join(str(uuid.UUID(k.key_id).int) for k in keys)}")
        else:
            wanted = {uuid.UUID(k).int - 1 for k in call.key_ids}
            if not wanted <= self.reserved:
                self.feed(b, QkdFetchFailed(call.request, "one or more keys specified are"
                                            " not found on KME"), "KME: no such key")
                return
            self.reserved -= wanted
            keys = tuple(_key(uuid.UUID(k).int - 1, how == "corrupt") for k in call.key_ids)
            self.feed(b, QkdKeysFetched(call.request, keys),
                      f"KME: {'corrupted ' if how == 'corrupt' else ''}key"
                      f" {','.join(str(uuid.UUID(k).int) for k in call.key_ids)}")

    def sink(self, b: Build, how: str) -> None:
        """The oldest sink call ends: HOW "ok", "fail", or "crash" (done, then the process
        dies before it hears so)."""
        call = b.sink.pop(0).call
        b.touched = True
        name = _call_name(call)
        if how == "fail":
            self.feed(b, self.sink_failed(b, call), f"sink: {name} fails")
            return
        answer = self.sink_done(b, call)
        if how == "crash":
            self.say(b.name, f"sink: {name} done")
            self.restart(b, keep_state=True, what="crashes before it hears so, restarts")
        elif answer is not None:
            self.feed(b, answer, f"sink: {name} done")
        else:
            self.say(b.name, f"sink: {name} done")

    def sink_failed(self, b: Build, call: Call) -> Event:
        if isinstance(call, InstallInbound):
            return InstallFailed(call.material.epoch, "refused")
        if isinstance(call, ActivateOutbound):  # the data plane sends on what it had
            return ActivateFailed(call.material.epoch, "refused")
        if isinstance(call, RetireInbound | RetireOutbound):  # the key stays
            return RetireFailed(call.ref, isinstance(call, RetireOutbound), "refused")
        assert isinstance(call, Block)
        b.own_plane().refuse_block()  # the data plane goes on as it was
        return BlockFailed("refused")

    def sink_done(self, b: Build, call: Call) -> Event | None:
        plane = b.own_plane()
        peer = self.sides["R" if b.name == "I" else "I"]
        if isinstance(call, InstallInbound):
            m = call.material
            plane.install(m.epoch, m.inbound_esp)
            self.bad += self.own_ledger().note_keys(
                m.epoch, m.key_ids, m.inbound_esp if b.name == "R" else None)
            return SinkInstalled(m.epoch)
        if isinstance(call, ActivateOutbound):
            m = call.material
            self.bad += plane.activate(m.epoch, m.outbound_esp, self.now)
            self.bad += self.own_ledger().note_keys(
                m.epoch, m.key_ids, m.outbound_esp if b.name == "I" else None)
            return SinkActivated(m.epoch)
        if isinstance(call, RetireInbound):
            self.bad += invariants.retire_inbound(plane, peer.plane, call.ref.epoch, self.now,
                                                  self.x.policy.grace)
        elif isinstance(call, RetireOutbound):
            self.bad += plane.retire_outbound(call.ref.epoch, self.now)
        elif isinstance(call, Block):
            plane.block(self.now)
        return None

    def restart(self, b: Build, *, keep_state: bool, what: str) -> None:
        """The daemon restarts: its calls in progress die with it; the data plane keeps its
        keys; the core comes back from the state file (or none) and hears the KMS status.
        A state file is lost in a reinstall, which takes longer than a message's flight:
        the old process's messages are gone by then (delivered or lost: the paths where
        they were delivered first are explored too). Without that, an old Offer could
        supersede the new process's epoch at the responder, which would retire the key the
        new process just switched to; nothing in the messages tells the two apart."""
        if not keep_state:
            b.snapshot = None
            self.drastic = True
            self.net = tuple(w for w in self.net if w.to == b.name)
            if b.name == "I":
                self.own_ledger().state_lost()
        b.sink.clear()
        b.kms.clear()
        b.changed = b.touched = True
        rng = CountingRng(b.name, b.half.rng.process + 1)
        role = Role.INITIATOR if b.name == "I" else Role.RESPONDER
        try:
            m = LinkMachine(identity(role), self.x.policy, now=self.now, snapshot=b.snapshot,
                            rng=rng, kem=KEM, check_transitions=True)
            rng.sync(m.max_epoch)
            actions = m.start(self.now)
        except Exception as e:
            self.bad.append(f"{b.name} could not restart: {type(e).__name__}: {e}")
            return
        b.m, b.rng = m, rng
        self.say(b.name, "; ".join([what, *_summary(actions)]))
        self.execute(b, actions)
        self.feed(b, self.x.status[b.name], "KMS status")

    def tick(self) -> None:
        """Time jumps to the next deadline of either side; the sides due then tick."""
        due = [d for d in (self.s.i.deadline, self.s.r.deadline) if d is not None]
        self.now = max(self.now, min(due))
        late = False
        for b in self.sides.values():
            late |= any(not p.late for p in (*b.sink, *b.kms))
            b.sink = [Pending(p.call, True) for p in b.sink]
            b.kms = [Pending(p.call, True) for p in b.kms]
        self.say("N", f"t={self.now:g}{' (calls in progress: late)' if late else ''}")
        for b in self.sides.values():
            if b.half.deadline is not None and b.half.deadline <= self.now:
                self.feed(b, Tick(), "tick")
                m = b.load()[0]
                d = m.next_deadline()
                if d is not None and d <= self.now:
                    self.bad.append(f"{b.name}: a Tick left a deadline due: the daemon"
                                    " would spin")

    # -- the result -------------------------------------------------------------------------------

    def finish(self, fault: bool) -> tuple[Node, Line, list[str]]:
        grace = self.x.policy.grace
        i = self.sides["I"].freeze(self.now, grace)
        r = self.sides["R"].freeze(self.now, grace)
        busy = [any(isinstance(p.call, Block) or (isinstance(p.call, ActivateOutbound)
                    and p.call.material.epoch != h.plane.outbound) for p in h.sink)
                for h in (i, r)]
        self.bad += invariants.check(i.plane, r.plane, self.now, self.x.policy,
                                     self.x.policy, busy[0], busy[1])
        faults = self.faults + fault
        key = hash((i.key, r.key, self.net, self.issued, self.reserved,
                    _ledger_canon(self.ledger), faults, self.drastic))
        node = Node(self.now, i, r, self.net, self.issued, self.reserved, self.ledger,
                    faults, self.drastic, key)
        return node, Line(self.now, self.text["I"], self.text["N"], self.text["R"]), self.bad


# -- the search ------------------------------------------------------------------------------------


@dataclass
class Result:
    """What a search found: the figures, and a violation's trace to show."""

    states: int = 0
    transitions: int = 0
    depth: int = 0
    violations: int = 0
    liveness_violations: int = 0
    seconds: float = 0.0
    #: The shortest trace of the first violation, and what was violated.
    trace: list[Line] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    #: A state from which the fault-free continuation never converges: the trace to it,
    #: then the continuation.
    stuck: list[Line] = field(default_factory=list)
    continuation: list[Line] = field(default_factory=list)

    def figures(self) -> dict[str, int | float]:
        return {"states": self.states, "transitions": self.transitions, "depth": self.depth,
                "violations": self.violations,
                "liveness_violations": self.liveness_violations,
                "seconds": round(self.seconds, 1)}


class Explorer:
    """The breadth-first search over the world's states, within BOUNDS."""

    def __init__(self, bounds: Bounds, *, stop_at_first: bool = False,
                 progress: Callable[[str], None] | None = None) -> None:
        self.bounds = bounds
        self.policy = replace(POLICY, mode=bounds.mode)
        self.stop_at_first = stop_at_first
        self.progress = progress
        self.status = {name: KmsStatusObserved(
            stored_key_count=1000, key_size=256, kme_id=me, peer_kme_id=peer, qber=0.01,
            key_rate=50_000.0, link_up=True)
            for name, me, peer in (("I", "kme-a", "kme-b"), ("R", "kme-b", "kme-a"))}
        self._decoded: dict[bytes, Message] = {}

    def decoded(self, raw: bytes) -> Message:
        message = self._decoded.get(raw)
        if message is None:
            message = self._decoded[raw] = decode(raw)
        return message

    # -- the graph -------------------------------------------------------------------------------

    def roots(self, cold: Node, line: Line) -> list[tuple[Node, list[Line]]]:
        """Where the search starts: a cold start (COLD: both gateways start for the first
        time), and a running link (the cold start's fault-free continuation until both send
        on epoch 1, nothing in progress), so that the depth bound reaches a rekey. (A core
        that never gets there has only the first: the liveness check says what is wrong.)"""
        s, lines = cold, [line]
        for _ in range(ROOT_STEPS):
            if self.common(s) == 1 and not s.net and not any(h.sink or h.kms
                                                             for h in (s.i, s.r)):
                return [(cold, lines[:1]), (s, lines)]
            mv = next((m for m in self.moves(s) if not m.fault), None)
            if mv is None:
                break
            s, line, bad = self.apply(s, mv)
            if bad:
                break
            lines.append(line)
        return [(cold, lines[:1])]

    def initial(self) -> tuple[Node, Line, list[str]]:
        """Both gateways start for the first time, with their KMEs' status."""
        halves = []
        for name, role in (("I", Role.INITIATOR), ("R", Role.RESPONDER)):
            rng = CountingRng(name, -1)  # (replaced as the gateway starts)
            m = LinkMachine(identity(role), self.policy, now=0.0, rng=rng, kem=KEM)
            halves.append(Half(m, rng, DataPlane(name), (), (), None, None, 0, 0, 0.0))
        i, r = halves
        step = Step(self, Node(0.0, i, r, (), 0, frozenset(), Ledger(), 0, False, 0))
        for b in step.sides.values():
            step.restart(b, keep_state=True, what="starts")
        return step.finish(False)

    def moves(self, s: Node) -> list[Move]:
        """What can happen next, the fault-free first, in the order the fault-free
        continuation takes them."""
        out = [Move("sink", n) for n in "IR" if s.half(n).sink]
        out += [Move("kms", n, j) for n in "IR" for j in range(len(s.half(n).kms))]
        wires = sorted(set(s.net))
        out += [Move("deliver", arg=k) for k in range(len(wires))]
        pending = any(not p.late for h in (s.i, s.r) for p in (*h.sink, *h.kms))
        faulty = s.faults < self.bounds.faults and s.max_epoch <= self.bounds.epochs
        if (s.i.deadline is not None or s.r.deadline is not None) and (faulty or not pending):
            out.append(Move("time", fault=pending))
        if not faulty:
            return out
        for n in "IR":
            h = s.half(n)
            if h.sink:
                out += [Move("sink-fail", n, fault=True), Move("crash", n, fault=True)]
            for j, p in enumerate(h.kms):
                out.append(Move("kms-fail", n, j, fault=True))
                if isinstance(p.call, FetchQkdKeysById):
                    out.append(Move("kms-corrupt", n, j, fault=True))
                elif s.issued and not s.drastic:
                    out.append(Move("kms-replay", n, j, fault=True))
        for k, w in enumerate(wires):
            out.append(Move("lose", arg=k, fault=True))
            if s.net.count(w) < 2:
                out.append(Move("duplicate", arg=k, fault=True))
        for n in "IR":
            out.append(Move("restart", n, fault=True))
            if not s.drastic:
                out.append(Move("restart-blank", n, fault=True))
        return out

    def apply(self, s: Node, mv: Move) -> tuple[Node, Line, list[str]]:
        step = Step(self, s)
        if mv.kind == "time":
            step.tick()
        elif not mv.side:
            w = sorted(set(s.net))[mv.arg]
            {"deliver": step.deliver, "lose": step.lose, "duplicate": step.duplicate}[mv.kind](w)
        else:
            b = step.sides[mv.side]
            if mv.kind in ("sink", "sink-fail", "crash"):
                step.sink(b, {"sink": "ok", "sink-fail": "fail", "crash": "crash"}[mv.kind])
            elif mv.kind.startswith("kms"):
                step.kms(b, mv.arg, mv.kind[4:] or "ok")
            else:
                keep = mv.kind == "restart"
                step.restart(b, keep_state=keep, what="restarts from its state" if keep
                             else "restarts without its state file")
        return step.finish(mv.fault)

    @staticmethod
    def common(s: Node) -> int:
        """The epoch both data planes send on, or 0."""
        i, r = s.i.plane, s.r.plane
        if i.sending is None or i.sending != r.sending or i.stopping or r.stopping:
            return 0
        return i.sending

    @staticmethod
    def newest(s: Node) -> int:
        """The newest epoch either data plane ever sent on."""
        return max(s.i.plane.sent_on[-1:] + s.r.plane.sent_on[-1:], default=0)

    # -- breadth first ---------------------------------------------------------------------------

    def run(self) -> Result:
        # The states hold no reference cycles; the collector's passes over millions of live
        # objects would cost a sixth of the time.
        enabled = gc.isenabled()
        gc.disable()
        try:
            with stand_ins():
                return self._run()
        finally:
            if enabled:
                gc.enable()

    def _run(self) -> Result:
        started = time.monotonic()
        res = Result()
        b = self.bounds
        cold, line, bad = self.initial()
        if bad:
            res.violations, res.trace, res.broken = 1, [line], bad
            return res
        roots = self.roots(cold, line)
        ids: dict[int, int] = {}
        parent, move, depth = array("q"), array("i"), array("i")
        desig, base, common, top = array("q"), array("i"), array("i"), array("i")
        frontier: deque[tuple[int, Node]] = deque()
        for n, (root, _) in enumerate(roots):
            ids[root.key] = n
            parent.append(-1)
            move.append(n)  # a root's "move": which root
            depth.append(0)
            desig.append(-1)
            base.append(self.newest(root))
            common.append(self.common(root))
            top.append(root.max_epoch)
            frontier.append((n, root))
        first_bad: tuple[int, int] | None = None
        while frontier:
            sid, s = frontier.popleft()
            d = depth[sid]
            if s.max_epoch > b.epochs + b.slack:
                continue  # beyond the bound: a leaf
            full = d < b.depth and s.max_epoch <= b.epochs
            for k, mv in enumerate(self.moves(s)):
                designated = not mv.fault and desig[sid] == -1
                if not (full or designated):
                    continue
                node, _, bad = self.apply(s, mv)
                res.transitions += 1
                nid = ids.get(node.key)
                if nid is None:
                    nid = ids[node.key] = len(parent)
                    parent.append(sid)
                    move.append(k)
                    depth.append(d + 1)
                    desig.append(-1)
                    base.append(self.newest(node))
                    common.append(self.common(node))
                    top.append(node.max_epoch if not bad else -1)
                    res.depth = max(res.depth, d + 1)
                    if not bad:
                        frontier.append((nid, node))
                if designated:
                    desig[sid] = nid
                if bad:
                    res.violations += 1
                    res.kinds.update(_kind_of(v) for v in bad)
                    if first_bad is None:
                        first_bad = (sid, k)
                        res.broken = bad
                        if self.stop_at_first:
                            frontier.clear()
                            break
            if self.progress and sid % 20000 == 0 and sid:
                self.progress(f"{len(parent)} states, {res.transitions} transitions, depth"
                              f" {res.depth}, {time.monotonic() - started:.0f} s")
        res.states = len(parent)
        if first_bad is not None:
            res.trace = self.replay(self.path(parent, move, first_bad[0]) + [first_bad[1]],
                                    roots)
        elif not self.stop_at_first:
            self._liveness(res, parent, move, desig, base, common, top, roots)
        res.seconds = time.monotonic() - started
        return res

    def path(self, parent: array[int], move: array[int], sid: int) -> list[int]:
        """The moves from a root to SID, the first naming the root."""
        moves = []
        while parent[sid] != -1:
            moves.append(move[sid])
            sid = parent[sid]
        return [move[sid], *moves[::-1]]

    def replay(self, moves: list[int], roots: list[tuple[Node, list[Line]]], then: int = 0
               ) -> list[Line]:
        """The lines of the path MOVES (the first naming its root), and THEN steps of the
        fault-free continuation after it, computed again."""
        s, lines = roots[moves[0]]
        lines = list(lines)
        for k in moves[1:]:
            s, line, _ = self.apply(s, self.moves(s)[k])
            lines.append(line)
        for _ in range(then):
            mv = next((m for m in self.moves(s) if not m.fault), None)
            if mv is None:
                break
            s, line, _ = self.apply(s, mv)
            lines.append(line)
        return lines

    def _liveness(self, res: Result, parent: array[int], move: array[int], desig: array[int],
                  base: array[int], common: array[int], top: array[int],
                  roots: list[tuple[Node, list[Line]]]) -> None:
        """From every state where faults may happen (epoch numbers up to the bound), the
        fault-free continuation (the designated successors, through the states past the
        bound too) reaches a state whose common epoch is newer than the state's newest."""
        n = len(parent)
        best = array("i", [-1]) * n  # the highest common epoch on the continuation
        on_path = bytearray(n)
        for start in range(n):
            path = []
            x = start
            while x != -1 and best[x] == -1 and not on_path[x]:
                on_path[x] = 1
                path.append(x)
                x = desig[x]
            if x == -1:
                after = 0
            elif best[x] != -1:
                after = best[x]
            else:  # a cycle: the continuation goes round it for ever
                cycle = path[path.index(x):]
                after = max(common[c] for c in cycle)
                for c in cycle:
                    best[c] = after
                path = path[:path.index(x)]
            for p in reversed(path):
                after = max(after, common[p])
                best[p] = after
            for p in path:
                on_path[p] = 0
        stuck = [s for s in range(n) if 0 <= top[s] <= self.bounds.epochs and best[s] <= base[s]]
        res.liveness_violations = len(stuck)
        if stuck:
            moves = self.path(parent, move, stuck[0])  # (the first found: the shallowest)
            res.stuck = self.replay(moves, roots)
            res.continuation = self.replay(moves, roots, then=80)[len(res.stuck):]


def _kind_of(violation: str) -> str:
    """A violation's message without its numbers: what kind of rule broke."""
    return " ".join("#" if any(c.isdigit() for c in w) else w for w in violation.split())


# -- output --------------------------------------------------------------------------------------

_W = 44


def chart(lines: list[Line], first: int = 0) -> str:
    """A message sequence chart: one line a step, I | network | R."""
    out = [f"{'step':>4} {'time':>6}  {'I':<{_W}} | {'network':<24} | R"]
    for n, line in enumerate(lines, first):
        out.append(f"{n:>4} {line.now:>6g}  {line.i:<{_W}} | {line.net:<24} | {line.r}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.gateway.explore", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"""
bounds:
  The state space is finite because every path is cut three ways: faults (at most
  --faults on a path), epoch numbers (faults only while no number above --epochs is in
  use) and depth (faults only in the first --depth steps from either start: a cold start
  and a running link on epoch 1). Past the epoch or depth bound only the fault-free
  continuation is followed, up to --slack numbers more: what the liveness check needs.
  A fault: a message lost or duplicated, a KMS request failed, corrupted or replayed, a
  sink call failed, a restart, time passing over a KMS request or sink call in progress.
  CI bound:   --epochs {CI.epochs} --faults {CI.faults} --depth {CI.depth} --slack {CI.slack}
  soak bound: --epochs {SOAK.epochs} --faults {SOAK.faults} --depth {SOAK.depth}\
 --slack {SOAK.slack} (--soak)

The last line is one JSON object: states, transitions, depth, violations,
liveness_violations, seconds. Exit status 0 only without violations.""")
    parser.add_argument("--soak", action="store_true", help="the soak bound")
    parser.add_argument("--epochs", type=int, help="faults only up to this epoch number")
    parser.add_argument("--faults", type=int, help="faults on one path")
    parser.add_argument("--depth", type=int, help="steps on one path with faults allowed")
    parser.add_argument("--slack", type=int, help="epoch numbers the fault-free continuation"
                        " may go past --epochs")
    parser.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.QKD_PQC.value,
                        help="both gateways' mode (qkd+pqc)")
    parser.add_argument("--stop-at-first", action="store_true",
                        help="stop at the first violation (its trace is still the shortest)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    bounds = SOAK if args.soak else CI
    bounds = replace(bounds, mode=Mode(args.mode), **{
        k: v for k, v in (("epochs", args.epochs), ("faults", args.faults),
                          ("depth", args.depth), ("slack", args.slack)) if v is not None})
    print(f"exploring: {bounds.mode.value}, epochs {bounds.epochs} (+{bounds.slack} fault-free),"
          f" {bounds.faults} faults, depth {bounds.depth}", flush=True)
    res = Explorer(bounds, stop_at_first=args.stop_at_first, progress=None if args.quiet
                   else lambda text: print(text, file=sys.stderr, flush=True)).run()
    print(f"{res.states} states, {res.transitions} transitions, depth {res.depth},"
          f" {res.seconds:.1f} s")
    if res.trace:
        print(f"\nVIOLATION ({res.violations} violating transitions; kinds:"
              f" {dict(res.kinds)}); the shortest trace:")
        print(chart(res.trace))
        for v in res.broken:
            print(f"     ✗ {v}")
    if res.stuck:
        print(f"\nLIVENESS: from {res.liveness_violations} states the fault-free"
              " continuation reaches no common newer epoch; the shortest trace to one:")
        print(chart(res.stuck))
        print("     --- faults stop: the fault-free continuation ---")
        print(chart(res.continuation, len(res.stuck)))
    print(json.dumps(res.figures()))
    return 0 if not res.violations and not res.liveness_violations else 1


if __name__ == "__main__":
    sys.exit(main())

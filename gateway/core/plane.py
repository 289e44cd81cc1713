"""What the data plane answered: each sink call's outcome, done or failed, and what the core
does about it (protocol.md, "When a sink fails"). An install that fails gives the epoch up;
a switch that fails blocks the link (what it sends on is unknown); a retire or a block that
fails is tried again after a backoff. Every failure raises `sink-failed`.
"""

from __future__ import annotations

from common.sink import Role
from gateway.core.events import (
    Action,
    ActivateFailed,
    Alarm,
    Block,
    BlockFailed,
    Cause,
    InstallFailed,
    RetireFailed,
    Send,
    SinkActivated,
    SinkInstalled,
)
from gateway.core.keyring import InstalledKey
from gateway.core.link import LinkCore
from gateway.core.messages import AbortReason
from gateway.core.table import IllegalEvent, State, need


class PlaneHandlers(LinkCore):
    """The sinks' answers that are not the protocol's next step (that is in the roles'
    handlers): failures, and answers for an exchange already given up."""

    def _install_failed(self, event: InstallFailed, now: float) -> list[Action]:
        a = need(self.attempt, "the exchange")
        if event.epoch != a.epoch:
            return self._late_install_failed(event, now)
        out = self._late_install_failed(event, now)
        if self.role is Role.RESPONDER and a.offer is not None:
            out.append(Send(self._abort_msg(a.offer, AbortReason.SINK_FAILED)))
        return out + self._give_up(now, f"sink failed: {event.reason}", Cause.SINK,
                                   failed=True) + \
            self._alarm(Alarm.SINK_FAILED, event.reason)

    def _late_install(self, event: SinkInstalled, now: float) -> list[Action]:
        """An install that finished after its exchange was abandoned (the key stays tracked
        and is retired by the usual rule) or after the epoch was already retired."""
        if event.epoch > self.max_epoch:
            raise IllegalEvent(f"SinkInstalled for epoch {event.epoch}, never installed")
        return []

    def _late_install_failed(self, event: InstallFailed, now: float) -> list[Action]:
        if event.epoch > self.max_epoch:
            raise IllegalEvent(f"InstallFailed for epoch {event.epoch}, never installed")
        return self.keys.forget(event.epoch)  # clean up

    def _activation_failed(self, event: ActivateFailed, now: float) -> list[Action]:
        """A sink could not switch: what the data plane sends on is unknown, so it is
        blocked (fail closed) and the exchange given up; the next epoch starts afresh."""
        a = self.attempt
        why = f"epoch {event.epoch}: could not switch to its key: {event.reason}"
        o = self.keys.outbound
        if a is None or a.epoch != event.epoch or self.state is not State.ACTIVATING:
            if o is None or o.ref.epoch != event.epoch:
                return []  # a later epoch is in use already
            return self._plane_failed(why, now)  # late, but it failed on the current key
        return self._plane_failed(why, now) + self._give_up(now, why, Cause.SINK, failed=True)

    def _plane_failed(self, why: str, now: float) -> list[Action]:
        return [Block(why), *self.keys.unplug(now), *self._alarm(Alarm.SINK_FAILED, why)]

    def _late_activated(self, event: SinkActivated, now: float) -> list[Action]:
        """An activation that finished after its exchange was given up: the key is in use
        (the peer installed it before), nothing more to say."""
        return []

    def _retire_failed(self, event: RetireFailed, now: float) -> list[Action]:
        """The key is still in the data plane: try again after a backoff."""
        again = InstalledKey(event.ref, now + self.policy.retry_backoff)
        ring = self.keys.replaced if event.outbound else self.keys.inbound
        ring.setdefault(event.ref.epoch, again)
        return self._alarm(Alarm.SINK_FAILED, f"epoch {event.ref.epoch}: could not retire its"
                           f" {'out' if event.outbound else 'in'}bound key: {event.reason};"
                           " trying again")

    def _block_failed(self, event: BlockFailed, now: float) -> list[Action]:
        """The link's traffic could not be blocked: block again after a backoff, until it
        works or a fresh key makes it moot."""
        self.reblock_at = now + self.policy.retry_backoff
        return self._alarm(Alarm.SINK_FAILED, f"could not block the link's traffic:"
                           f" {event.reason}; trying again")

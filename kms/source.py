"""The key source contract: what the gateway asks of the system that hands it QKD keys,
whatever protocol it speaks (ETSI GS QKD 014: kms/client.py; SKIP: kms/skip.py).

The initiator is the master: `enc_keys` takes new keys shared with the peer; the responder
the slave: `dec_keys` takes the same keys by their IDs. `source_status` is what the gateway
reads of the source's health and supply; a figure the protocol does not give is None
(unknown, never zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kms.client import KeyBatch
from kms.models import SourceStatus


class KeySource(Protocol):
    @property
    def max_call_seconds(self) -> float:
        """The longest one call can take, retries included."""

    async def source_status(self, peer: str, /) -> SourceStatus: ...

    async def enc_keys(self, peer: str, number: int = 1, size: int | None = None, /
                       ) -> KeyBatch: ...

    async def dec_keys(self, peer: str, key_ids: Sequence[str], /, *,
                       size: int | None = None) -> KeyBatch: ...

    async def close(self) -> None: ...

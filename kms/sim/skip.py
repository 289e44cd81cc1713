"""The simulator's KMEs as SKIP Key Providers (draft-cisco-skip-02), for their links of
`protocol: skip`: the same link model (key rate, QBER, outages) and the same faults as their
ETSI GS QKD 014 side, over TLS-PSK (common/skip_server.py).

Each KME's localSystemID is its id, its remote systems the KMEs it shares SKIP links with.
A client's PSK identity must be one of the KME's SAEs. A new key takes bits from the link and
waits for the other Key Provider's client to fetch it by ID, once (`reserved_key_ttl`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from common.config import ConfigError
from common.psktls import PskTable
from common.skip import (
    Capabilities,
    EntropyResponse,
    GetCapabilities,
    GetEntropy,
    KeyById,
    KeyResponse,
    NewKey,
    Request,
    SkipError,
)
from kms.sim.config import KmeConfig
from kms.sim.faults import FaultKind, FaultTable
from kms.sim.service import Network

ALGORITHM = "QKD"


def psk_table(kme: KmeConfig) -> PskTable:
    """KME's SKIP clients: each identity one of its SAEs."""
    if kme.skip is None:
        raise ConfigError(f"KME {kme.id} has no skip section")
    table = PskTable.load(kme.skip.psk_file)
    strangers = sorted(i.decode() for i in table.keys if i.decode() not in kme.saes)
    if strangers:
        raise ConfigError(f"{kme.skip.psk_file}: {', '.join(strangers)}: not an SAE of KME"
                          f" {kme.id} ({', '.join(kme.saes)})")
    return table


class SimKeyProvider:
    def __init__(self, kme: KmeConfig, network: Network, faults: FaultTable,
                 clock: Callable[[], float]) -> None:
        self.kme, self.network, self.faults, self.clock = kme, network, faults, clock

    def answer(self, request: Request, client: str) -> dict[str, Any]:
        now = self.clock()
        fault = self.faults.take(self.kme.id, "skip", now)
        if fault is not None and fault.spec.kind is FaultKind.ERROR_503:
            raise SkipError(503, "fault injected: Key Provider temporarily unable to serve")
        match request:
            case GetCapabilities():
                remotes = self.network.skip_remotes(self.kme) or [self.kme.id]
                return Capabilities.model_validate({
                    "entropy": True, "key": True, "algorithm": ALGORITHM,
                    "localSystemID": self.kme.id, "remoteSystemID": remotes}).body()
            case GetEntropy(bits=bits):
                return EntropyResponse.model_validate(
                    {"randomStr": secrets.token_hex(bits // 8), "minentropy": bits}).body()
            case NewKey(remote_system_id=remote, bits=bits):
                key_id, key = self.network.skip_new_key(self.kme, remote, bits, now)
            case KeyById(remote_system_id=remote, key_id=key_id):
                key = self.network.skip_key_by_id(self.kme, remote, key_id, now)
        return KeyResponse.model_validate({"keyId": key_id, "key": key.hex()}).body()

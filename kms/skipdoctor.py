"""`qkdgw kms doctor` for a SKIP Key Provider (draft-cisco-skip-02): the probes of
kms/doctor.py, as the draft has them. As this site's gateway (its PSK) and, with the peer
site's configuration, as the peer's, against the peer's Key Provider:

- capabilities: the fields and types of §4.1, `localSystemID` as configured, the peer's
  Key Provider among `remoteSystemID`, `key` true;
- new keys: the default size (256 bits, §4.2.2) and the sizes asked for, hex key IDs;
- by ID at the peer: the same key; a second fetch and a fetch at the origin refused (400);
- refusals: an unknown or malformed key ID (400), another method (405), another path (404),
  a size out of range (400);
- entropy (§4.3) when offered: `minentropy` honoured.

Findings are kms/doctor.py's `Finding`s; keys are compared, never shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from common.psktls import ClientContext
from common.skip import Capabilities, EntropyResponse, KeyResponse
from common.skip_client import SkipClient, SkipClientError
from common.text import quote_remote
from kms.client import describe_invalid
from kms.doctor import NO_SLAVE, Finding, Findings

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class SkipSide:
    """One gateway's view: its Key Provider, its PSK, the Key Provider's expected ID."""

    host: str
    port: int
    tls: ClientContext
    system_id: str


@dataclass
class SkipDoctor:
    local: SkipSide
    peer_id: str  # the peer's Key Provider ID (the link's peer.sae_id)
    peer: SkipSide | None = None
    findings: Findings = field(default_factory=Findings)

    async def run(self) -> list[Finding]:
        kp = SkipClient(self.local.host, self.local.port, self.local.tls)
        caps = await self._capabilities(kp)
        if caps is None:
            return self.findings
        made = await self._new_keys(kp)
        await self._refusals(kp)
        if caps.entropy:
            await self._entropy(kp)
        else:
            self.findings.note("entropy", "SKIP", "§4.3", "the Key Provider offers none")
        if self.peer is None:
            for probe in ("key by ID at the peer", "key IDs single-use",
                          "key by ID at the origin"):
                self.findings.note(probe, "SKIP", "", NO_SLAVE)
        elif made is not None:
            await self._at_the_peer(kp, SkipClient(self.peer.host, self.peer.port,
                                                   self.peer.tls), made)
        return self.findings

    async def _valid(self, kp: SkipClient, model: type[M], probe: str, clause: str,
                     path: str, query: dict[str, str] | None = None) -> M | None:
        """GET PATH?QUERY as MODEL; None, and the probe FAIL saying why, if it is not one."""
        got = await self._get(kp, path, query)
        if got is None:
            return None
        status, body = got
        if status != 200:
            self.findings.note(probe, "FAIL", clause, f"HTTP {status}: {_reason(body)}")
            return None
        try:
            return model.model_validate(body)
        except ValidationError as e:
            self.findings.note(probe, "FAIL", clause, f"malformed: {describe_invalid(e)}")
            return None

    async def _capabilities(self, kp: SkipClient) -> Capabilities | None:
        caps = await self._valid(kp, Capabilities, "capabilities", "§4.1", "/capabilities")
        if caps is None:
            return None
        self.findings.note("capabilities", "PASS", "§4.1", f"localSystemID {caps.local_system_id},"
                           f" remoteSystemID {', '.join(caps.remote_system_id)}, algorithm"
                           f" {quote_remote(caps.algorithm, limit=40)}")
        problems = []
        if caps.local_system_id != self.local.system_id:
            problems.append(f"names itself {caps.local_system_id}, configured as"
                            f" {self.local.system_id}")
        if not caps.reaches(self.peer_id):
            problems.append(f"shares no keys with {self.peer_id}")
        if not caps.key:
            problems.append("serves no keys (key: false)")
        self.findings.note("capabilities fields", "FAIL" if problems else "PASS", "§4.1",
                           "; ".join(problems) or f"itself as configured, {self.peer_id} reached,"
                           " keys served")
        return caps

    async def _new_keys(self, kp: SkipClient) -> KeyResponse | None:
        first: KeyResponse | None = None
        for bits in (None, 128, 512):
            probe = f"new key {bits or 'default'}{' bits' if bits else ' size'}"
            key = await self._valid(kp, KeyResponse, probe, "§4.2", "/key",
                                    {"remoteSystemID": self.peer_id}
                                    | ({"size": str(bits)} if bits else {}))
            if key is None:
                continue
            want = bits or 256
            size = len(key.key_bytes) * 8
            self.findings.note(probe, "PASS" if size == want else "FAIL", "§4.2.2",
                               f"{size} bits" + ("" if size == want else f", not {want}"))
            first = first or key
        return first

    async def _refusals(self, kp: SkipClient) -> None:
        cases: list[tuple[str, str, str, dict[str, str] | None, int, str]] = [
            ("unknown key ID refused", "GET", "/key/" + "00" * 16,
             {"remoteSystemID": self.peer_id}, 400, "§4.2, Table 7"),
            ("malformed key ID refused", "GET", "/key/not-hex",
             {"remoteSystemID": self.peer_id}, 400, "§4.2, Table 7"),
            ("size out of range refused", "GET", "/key",
             {"remoteSystemID": self.peer_id, "size": "7"}, 400, "§4.2, Table 7"),
            ("other methods refused", "POST", "/key", {"remoteSystemID": self.peer_id},
             405, "§4, Table 3"),
            ("unknown path refused", "GET", "/keys", None, 404, "§4, Table 3"),
        ]
        for probe, method, path, query, expected, clause in cases:
            got = await self._get(kp, path, query, method=method)
            if got is None:
                continue
            status, body = got
            if status == 200:
                self.findings.note(probe, "FAIL", clause, "answered 200" + (
                    " with a key" if "key" in body else ""))
            elif status != expected:
                self.findings.note(probe, "WARN", clause, f"HTTP {status}, not {expected}")
            else:
                self.findings.note(probe, "PASS", clause, f"HTTP {status}")

    async def _entropy(self, kp: SkipClient) -> None:
        e = await self._valid(kp, EntropyResponse, "entropy", "§4.3", "/entropy",
                              {"minentropy": "512"})
        if e is None:
            return
        ok = e.minentropy >= 512 and len(e.random_str) * 4 >= 512
        self.findings.note("entropy", "PASS" if ok else "FAIL", "§4.3",
                           f"minentropy {e.minentropy}, {len(e.random_str) * 4} bits")

    async def _at_the_peer(self, kp: SkipClient, peer: SkipClient, made: KeyResponse) -> None:
        query = {"remoteSystemID": self.local.system_id}
        got = await self._get(peer, f"/key/{made.key_id}", query)
        if got is not None:
            status, body = got
            same = status == 200 and body.get("key", "").lower() == made.key.lower()
            self.findings.note("key by ID at the peer", "PASS" if same else "FAIL", "§4.2",
                               "the same key at both Key Providers" if same else
                               f"HTTP {status}" + (": a different key" if status == 200 else
                                           f": {_reason(body)}"))
        again = await self._get(peer, f"/key/{made.key_id}", query)
        if again is not None:
            self._refused_once("key IDs single-use", again, "§3 (the keys zeroized once"
                               " provided)")
        other = await self._get(kp, "/key", {"remoteSystemID": self.peer_id})
        if other is not None and other[0] == 200:
            origin = await self._get(kp, f"/key/{other[1].get('keyId', '')}",
                                     {"remoteSystemID": self.peer_id})
            if origin is not None:
                self._refused_once("key by ID at the origin", origin, "§3")

    def _refused_once(self, probe: str, got: tuple[int, dict[str, Any]], clause: str) -> None:
        status, _ = got
        if status == 200:
            self.findings.note(probe, "FAIL", clause, "delivered again: anyone with a PSK of"
                               " the Key Provider could take a router's key")
        else:
            self.findings.note(probe, "PASS" if status == 400 else "WARN", clause, f"HTTP {status}")

    async def _get(self, kp: SkipClient, path: str, query: dict[str, str] | None = None,
                   *, method: str = "GET") -> tuple[int, dict[str, Any]] | None:
        try:
            return await kp.get(path, query, method=method)
        except SkipClientError as e:
            self.findings.note(f"{method} {path.split('/')[1]}", "FAIL", "§3", f"no answer: {e}")
            return None



def _reason(body: dict[str, Any]) -> str:
    reason = body.get("error") or body.get("message")
    return quote_remote(reason, limit=100) if isinstance(reason, str) else "no reason given"


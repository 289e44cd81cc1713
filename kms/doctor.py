"""`qkdgw kms doctor`: probe a KME before trusting it, as the SAEs the gateway would be.

As the master SAE (the site's own credentials) and, when given the peer site's, as the slave:
the status and its fields; enc_keys by POST and GET, sizes, `max_key_per_request`,
extensions; dec_keys only for the slave, with the master in the URL; keys identical on both
sides; key IDs single-use; error bodies. And what breaks gateways in practice where the spec
is vague (docs/etsi-014.md, "Traps of other KMEs"): keys of an earlier enc_keys call gone
after a later one, a GET form that ignores `number` or `size`, a `stored_key_count` that
counts keys handed out.

Each probe is one `Finding`: PASS, WARN (works, but a gateway needs care: the advice says
what), FAIL (the spec's clause broken, or the gateway cannot work), SKIP (cannot be probed
here: it says why). Nothing a KME answers ends the doctor: a probe that meets the
unexpected is a FAIL saying so. Keys are never shown: the doctor compares them.

The probes take keys from the KME: about 20 of `key_size`, and a few of its smallest and
largest sizes.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from common.text import quote_remote
from common.tlsctx import client_context
from kms.client import KeyBatch, KmeClient, RetryPolicy, Timeouts
from kms.errors import KmsError
from kms.models import Status

Verdict = Literal["PASS", "WARN", "FAIL", "SKIP"]
#: A max_key_per_request above this is not probed by asking for one more (that many keys).
MAX_PROBED_PER_REQUEST = 1024
#: Bytes of an answer read at most.
MAX_ANSWER = 1 << 20
#: The mandatory extension no KME knows: it must be refused.
PROBE_EXTENSION = "qkdgw_doctor_probe"
NO_SLAVE = ("needs the slave SAE's credentials: --peer-config SITE.yaml (the peer gateway's"
            " configuration)")


@dataclass(frozen=True)
class Finding:
    probe: str
    verdict: Verdict
    clause: str  # of ETSI GS QKD 014 V1.1.1, or "practice" for what the spec leaves open
    detail: str
    advice: str = ""

    def line(self) -> str:
        out = f"{self.verdict:<4}  {self.probe:<28} {self.detail}"
        if self.clause:
            out += f" [{self.clause}]"
        return out + (f"\n      → {self.advice}" if self.advice else "")


class Findings(list[Finding]):
    """The findings so far, each noted as it is made."""

    def note(self, probe: str, verdict: Verdict, clause: str, detail: str,
             advice: str = "") -> None:
        self.append(Finding(probe, verdict, clause, detail, advice))


@dataclass(frozen=True)
class Sae:
    """One SAE: its ID, its KME and its credentials."""

    sae_id: str
    url: str
    ca: Path
    cert: Path
    key: Path


@dataclass
class _Answer:
    status: int
    body: Any  # the JSON, or None
    text: str


@dataclass
class Doctor:
    master: Sae
    slave_id: str  # the peer SAE the master shares keys with
    slave: Sae | None = None  # its credentials, when given
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(3.0, 10.0, 15.0))
    findings: Findings = field(default_factory=Findings)

    async def run(self) -> list[Finding]:
        async with self._client(self.master) as m:
            st = await self._probe_status(m)
            if st is not None:
                await self._probes_as_master(m, st)
                if self.slave is None:
                    for probe in ("dec_keys by the slave", "key IDs single-use",
                                  "dec_keys GET form", "only the slave may fetch",
                                  "master in the dec_keys URL", "earlier batches kept"):
                        self.findings.note(probe, "SKIP", "", NO_SLAVE)
                else:
                    async with self._client(self.slave) as s:
                        await self._probes_with_slave(m, s, self.slave)
        return self.findings

    # -- as the master ----------------------------------------------------------------------

    async def _probe_status(self, m: KmeClient) -> Status | None:
        try:
            st = await m.status(self.slave_id)
        except KmsError as e:
            self.findings.note("status", "FAIL", "§5.1, §6.1", f"no valid Status: {e}",
                               "the other probes need it: fix this first")
            return None
        self.findings.note("status", "PASS", "§6.1", f"key_size {st.key_size}, stored"
                           f" {st.stored_key_count}, max_key_per_request {st.max_key_per_request},"
                           f" sizes {st.min_key_size}-{st.max_key_size}")
        problems = []
        if not st.min_key_size <= st.key_size <= st.max_key_size:
            problems.append(f"key_size {st.key_size} outside [{st.min_key_size},"
                            f" {st.max_key_size}]")
        if st.key_size % 8:
            problems.append(f"key_size {st.key_size} is not a whole number of bytes")
        if st.stored_key_count > st.max_key_count:
            problems.append(f"stored_key_count {st.stored_key_count} above max_key_count"
                            f" {st.max_key_count}")
        if st.master_SAE_ID != self.master.sae_id or st.slave_SAE_ID != self.slave_id:
            problems.append(f"names master {st.master_SAE_ID} and slave {st.slave_SAE_ID},"
                            f" asked as {self.master.sae_id} for {self.slave_id}")
        self.findings.note("status fields", "FAIL" if problems else "PASS", "§6.1 Table 4",
                           "; ".join(problems) or "consistent: sizes, counts, SAE IDs")
        return st

    async def _probes_as_master(self, m: KmeClient, st: Status) -> None:
        await self._expect_keys("enc_keys POST", "§5.2, §6.3",
                                lambda: m.enc_keys(self.slave_id, 2))
        other = st.min_key_size if st.min_key_size != st.key_size else st.max_key_size
        other = other if other % 8 == 0 else st.key_size
        await self._expect_keys(
            "enc_keys GET number and size", "§5.2 (GET form)",
            lambda: m.enc_keys(self.slave_id, 2, other, method="GET"),
            advice="the GET form ignores number or size: the gateway uses POST (keep it)")
        for size in sorted({st.min_key_size, st.max_key_size}):
            if size % 8 == 0:
                await self._expect_keys(f"enc_keys size {size}", "§6.2 Table 5",
                                        functools.partial(m.enc_keys, self.slave_id, 1, size))
        await self._refused("size not in bytes", "§6.2 Table 5",
                            {"number": 1, "size": st.key_size + 4}, severity="WARN")
        await self._refused("size above max_key_size", "§6.2 Table 5",
                            {"number": 1, "size": st.max_key_size + 8})
        if st.max_key_per_request > MAX_PROBED_PER_REQUEST:
            self.findings.note("max_key_per_request enforced", "SKIP", "§6.2 Table 5",
                               f"max_key_per_request {st.max_key_per_request} is too many keys to"
                               " ask for one more")
        else:
            await self._refused("max_key_per_request enforced", "§6.2 Table 5",
                                {"number": st.max_key_per_request + 1})
        await self._refused("extension_mandatory refused", "§6.2 Table 5",
                            {"number": 1, "extension_mandatory": [{PROBE_EXTENSION: True}]},
                            names=PROBE_EXTENSION)
        await self._probe_stored_count(m, st)

    async def _probe_stored_count(self, m: KmeClient, before: Status) -> None:
        taken = max(1, min(8, before.max_key_per_request))
        try:
            await m.enc_keys(self.slave_id, taken)
            after = await m.status(self.slave_id)
        except KmsError as e:
            self.findings.note("stored_key_count meaning", "FAIL", "§6.1", f"failed: {e}")
            return
        # Taking keys lowers the count; the link's own supply meanwhile raises it, but not by
        # as many as were taken within a second. A count that rises by what was taken counts
        # keys handed out.
        delta = after.stored_key_count - before.stored_key_count
        if delta >= taken:
            self.findings.note("stored_key_count meaning", "WARN", "practice",
                               f"rose by {delta} after {taken} keys were taken: it counts keys"
                               " handed out, not keys available",
                               "the gateway reads it as the pool: its supply figures and rationing"
                               " will be wrong; rely on enc_keys' own 503 instead")
        else:
            self.findings.note("stored_key_count meaning", "PASS", "§6.1 Table 4",
                               f"changed by {delta:+d} after {taken} keys were taken: keys"
                               " available")

    # -- with the slave ---------------------------------------------------------------------

    async def _probes_with_slave(self, m: KmeClient, s: KmeClient, slave: Sae) -> None:
        master_id = self.master.sae_id
        try:
            batch = await m.enc_keys(self.slave_id, 2)
        except KmsError as e:
            self.findings.note("dec_keys by the slave", "FAIL", "§5.2",
                               f"no keys to probe with: {e}")
            return
        got = await self._call(lambda: s.dec_keys(master_id, batch.key_ids))
        if isinstance(got, KmsError):
            self.findings.note("dec_keys by the slave", "FAIL", "§5.3", f"refused: {got}")
            return
        same = [a.material == b.material for a, b in zip(batch.keys, got.keys, strict=True)]
        self.findings.note("dec_keys by the slave", "PASS" if all(same) else "FAIL", "§5.3",
                           "keys identical on both sides" if all(same) else
                           f"{same.count(False)} of {len(same)} keys differ between the two SAEs")
        again = await self._raw(slave, "POST", f"{master_id}/dec_keys",
                                {"key_IDs": [{"key_ID": batch.key_ids[0]}]})
        if again.status == 200:
            self.findings.note("key IDs single-use", "WARN", "practice",
                               "a key ID was delivered twice", "keys should be deleted once"
                               " delivered: anyone with the slave's credentials gets them"
                               " again")
        else:
            self._error_answer("key IDs single-use", again, 400, "§5.3, §7")
        one = await self._call(lambda: m.enc_keys(self.slave_id, 1))
        if isinstance(one, KeyBatch):
            got = await self._call(lambda: s.dec_keys(master_id, one.key_ids, method="GET"))
            self.findings.note("dec_keys GET form", "FAIL" if isinstance(got, KmsError) else "PASS",
                               "§5.3 (GET form)", f"refused: {got}" if isinstance(got, KmsError)
                               else "one key_ID by GET")
        await self._only_the_slave(m, slave, master_id)
        await self._earlier_batches(m, s, master_id)

    async def _only_the_slave(self, m: KmeClient, slave: Sae, master_id: str) -> None:
        one = await self._call(lambda: m.enc_keys(self.slave_id, 1))
        if not isinstance(one, KeyBatch):
            self.findings.note("only the slave may fetch", "FAIL", "§5.2", f"no key: {one}")
            return
        key_id = one.key_ids[0]
        # The master asks its own KME for its key by ID, naming the slave: only the slave may.
        theft = await self._raw(self.master, "POST", f"{self.slave_id}/dec_keys",
                                {"key_IDs": [{"key_ID": key_id}]})
        if theft.status == 200:
            self.findings.note("only the slave may fetch", "FAIL", "§5.3",
                               "the master SAE got a key by ID: any SAE of the KME could",
                               "do not use this KME until it checks who asks")
        else:
            self._error_answer("only the slave may fetch", theft, 401, "§5.3")
        wrong = await self._raw(slave, "POST", f"{self.slave_id}/dec_keys",
                                {"key_IDs": [{"key_ID": key_id}]})
        if wrong.status == 200:
            self.findings.note("master in the dec_keys URL", "FAIL", "§5.3 Table 2",
                               "a key was delivered with the slave's own ID where the master's"
                               " belongs")
        else:
            self._error_answer("master in the dec_keys URL", wrong, 401, "§5.3 Table 2")

    async def _earlier_batches(self, m: KmeClient, s: KmeClient, master_id: str) -> None:
        first = await self._call(lambda: m.enc_keys(self.slave_id, 1))
        second = await self._call(lambda: m.enc_keys(self.slave_id, 1))
        if not isinstance(first, KeyBatch) or not isinstance(second, KeyBatch):
            self.findings.note("earlier batches kept", "FAIL", "§5.2", "no keys to probe with")
            return
        got = await self._call(lambda: s.dec_keys(master_id, first.key_ids))
        if isinstance(got, KeyBatch):
            self.findings.note("earlier batches kept", "PASS", "practice",
                               "a key of an earlier enc_keys call is fetched after a later call")
        else:
            self.findings.note("earlier batches kept", "WARN", "practice",
                               f"a key of an earlier enc_keys call is gone after a later one"
                               f" ({got})",
                               "the gateway's prefetch holds the next epoch's key across a later"
                               " call: set `prefetch: false` in the policy of links on this KME")
        await self._call(lambda: s.dec_keys(master_id, second.key_ids))  # (tidy up)

    # -- helpers ----------------------------------------------------------------------------

    def _client(self, sae: Sae) -> KmeClient:
        return KmeClient(sae.url, ca=sae.ca, cert=sae.cert, key=sae.key,
                         timeouts=self.timeouts, retry=RetryPolicy(attempts=1))

    @staticmethod
    async def _call(call: Callable[[], Awaitable[KeyBatch]]) -> KeyBatch | KmsError:
        try:
            return await call()
        except KmsError as e:
            return e

    async def _expect_keys(self, probe: str, clause: str,
                           call: Callable[[], Awaitable[KeyBatch]], advice: str = "") -> None:
        got = await self._call(call)
        if isinstance(got, KmsError):
            self.findings.note(probe, "FAIL", clause, str(got), advice)
        else:
            sizes = sorted({len(k.material) * 8 for k in got.keys})
            self.findings.note(probe, "PASS", clause, f"{len(got.keys)} key(s) of"
                               f" {', '.join(map(str, sizes))} bits")

    async def _refused(self, probe: str, clause: str, body: dict[str, Any], *,
                       severity: Verdict = "FAIL", names: str = "") -> None:
        """An enc_keys request the KME must refuse with 400 and an Error object."""
        answer = await self._raw(self.master, "POST", f"{self.slave_id}/enc_keys", body)
        if answer.status == 200:
            self.findings.note(probe, severity, clause,
                               "accepted (200): it should be refused (400)")
            return
        self._error_answer(probe, answer, 400, clause, names=names)

    def _error_answer(self, probe: str, answer: _Answer, expected: int, clause: str, *,
                      names: str = "") -> None:
        """ANSWER should be EXPECTED with an Error object (§6.5) that says why."""
        if answer.status <= 0:
            self.findings.note(probe, "FAIL", clause, answer.text)
            return
        message = answer.body.get("message") if isinstance(answer.body, dict) else None
        if not isinstance(message, str) or not message:
            # (the body is not shown: an answer nobody can parse may hold keys)
            self.findings.note(probe, "FAIL", "§6.5", f"HTTP {answer.status} without an Error"
                               f" object (a JSON object with `message`): {len(answer.text)}"
                               " characters that are not one")
        elif answer.status != expected:
            self.findings.note(probe, "WARN", clause, f"refused with HTTP {answer.status}, not"
                               f" {expected}: {quote_remote(message, limit=100)}")
        elif names and names not in message:
            self.findings.note(probe, "WARN", clause, f"HTTP {answer.status}, but the message"
                               f" does not name {names}: {quote_remote(message, limit=100)}")
        else:
            self.findings.note(probe, "PASS", clause,
                               f"refused: HTTP {answer.status}, {quote_remote(message, limit=100)}")

    async def _raw(self, sae: Sae, method: str, path: str, body: Any = None) -> _Answer:
        """A request the client would refuse to send (or whose refusal is the point)."""
        url = f"{sae.url.rstrip('/')}/api/v1/keys/{path}"
        ctx: ssl.SSLContext = client_context(sae.ca, sae.cert, sae.key)
        timeout = aiohttp.ClientTimeout(total=self.timeouts.total,
                                        sock_connect=self.timeouts.connect,
                                        sock_read=self.timeouts.read)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http, \
                    http.request(method, url, json=body, ssl=ctx,
                                 allow_redirects=False) as r:
                raw = await r.content.read(MAX_ANSWER)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return _Answer(0, None, f"no answer: {str(e) or type(e).__name__}")
        text = raw.decode("utf-8", "replace")
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return _Answer(r.status, parsed, text)


def report(findings: list[Finding]) -> dict[str, Any]:
    counts = {v: sum(f.verdict == v for f in findings) for v in ("PASS", "WARN", "FAIL",
                                                                "SKIP")}
    return {"findings": [asdict(f) for f in findings], "counts": counts,
            "ok": counts["FAIL"] == 0}

"""A hostile KME drawn by hypothesis: a real HTTPS server with mutual TLS whose answers
(status, headers, lengths, bodies with mutated members, extreme numbers, wrong types,
broken or truncated JSON, delays, trickles, dropped connections) hypothesis chooses, against
the real KmeClient.

The property: every call ends within its deadline, with either a validated answer (keys of
exactly the size, number and IDs asked for) or a KmsError, never another exception; no error
text and no log line carries a raw control character.

Default profile: a few dozen examples (seconds, CI). Long runs:
    HYPOTHESIS_PROFILE=soak .venv/bin/python -m pytest tests/kms/test_client_fuzz.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from common.tlsctx import server_context
from gateway.initdemo import DemoLayout
from kms import KeyBatch, KmeClient, KmsError, RetryPolicy, Timeouts
from kms.models import Status
from tests.kms.answers import Plan, plans
from tests.kms.hostile import Answer, HostileKme, Request

SOAK = os.environ.get("HYPOTHESIS_PROFILE") == "soak"
EXAMPLES = settings().max_examples if SOAK else 40

TIMEOUTS = Timeouts(connect=0.4, read=0.2, total=0.4)
RETRY = RetryPolicy(attempts=2, backoff=0.001, max_backoff=0.002)
#: Liveness margin over a call's own worst case (a loaded CI machine stalls; no timing test).
MARGIN = 5.0

# -- what the client asks --------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    op: str
    method: str
    number: int
    size: int | None

    def calls(self) -> int:
        """Client calls this makes: enc_keys without a size asks status first."""
        return 2 if self.op == "enc_keys" and self.size is None else 1


calls = st.builds(Call, op=st.sampled_from(["status", "enc_keys", "dec_keys"]),
                  method=st.sampled_from(["GET", "POST"]), number=st.integers(1, 3),
                  size=st.sampled_from([None, 64, 256, 512]))

IDS = [str(uuid.UUID(int=i + 1)) for i in range(3)]
#: Keys in an answer, as base64 (the hostile KME's valid keys are at least 64 bits).
KEY_IN_JSON = re.compile(rb'"key": "([A-Za-z0-9+/]{11,}=*)"')


async def _run(c: KmeClient, call: Call) -> Status | KeyBatch:
    if call.op == "status":
        return await c.status("sae-b")
    if call.op == "enc_keys":
        return await c.enc_keys("sae-b", call.number, call.size,
                                method=call.method)  # type: ignore[arg-type]
    number = 1 if call.method == "GET" else call.number
    return await c.dec_keys("sae-a", IDS[:number], size=call.size,
                            method=call.method)  # type: ignore[arg-type]


def _check_result(call: Call, result: Status | KeyBatch) -> None:
    if isinstance(result, Status):
        assert call.op == "status"
        for v in (result.stored_key_count, result.max_key_count, result.key_size):
            assert type(v) is int
            assert 0 <= v < 2**32
        assert result.qber is None or 0.0 <= result.qber <= 1.0
        assert result.key_rate is None or 0.0 <= result.key_rate <= 1e12
        return
    ids = result.key_ids
    assert len(set(ids)) == len(ids)
    for i in ids:
        uuid.UUID(i)
    if call.op == "enc_keys":
        assert len(ids) == call.number
        # without a size: the one the KME's (perhaps mutated, still valid) status announced
        assert len({k.size_bits for k in result.keys}) == 1
        assert call.size is None or all(k.size_bits == call.size for k in result.keys)
    else:
        assert ids == tuple(IDS[: 1 if call.method == "GET" else call.number])
        assert call.size is None or all(k.size_bits == call.size for k in result.keys)


# -- the hostile KME, once per module, on its own event loop ---------------------------------


@dataclass
class World:
    loop: asyncio.AbstractEventLoop
    kme: HostileKme
    demo: DemoLayout


@pytest.fixture(scope="module")
def world(demo: DemoLayout) -> Iterator[World]:
    loop = asyncio.new_event_loop()
    kme = HostileKme(server_context(demo.pki / "ca.pem", demo.pki / "kme-a.pem",
                                    demo.pki / "kme-a.key"))
    loop.run_until_complete(kme.start())
    yield World(loop, kme, demo)
    loop.run_until_complete(kme.stop())
    loop.close()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow,
                                                        HealthCheck.data_too_large])
@given(call=calls, script=st.lists(plans, min_size=1, max_size=3))
def test_every_call_ends_in_time_with_a_valid_answer_or_a_kms_error(
    world: World, call: Call, script: list[Plan]
) -> None:
    kme, d = world.kme, world.demo
    answers = iter(script)
    last = script[-1]

    secrets: set[str] = set()

    def respond(request: Request) -> Answer:
        answer = next(answers, last).answer(request)
        secrets.update(k.decode() for k in KEY_IN_JSON.findall(answer.body))
        return answer

    kme.respond = respond
    kme.requests.clear()
    lines = _Lines()
    logger = logging.getLogger("kms")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.DEBUG)

    async def run() -> tuple[Status | KeyBatch | KmsError, float, float]:
        async with KmeClient(kme.url, ca=d.pki / "ca.pem", cert=d.pki / "sae-a.pem",
                             key=d.pki / "sae-a.key", timeouts=TIMEOUTS, retry=RETRY) as c:
            bound = call.calls() * c.max_call_seconds
            start = time.monotonic()
            try:
                result: Status | KeyBatch | KmsError = await asyncio.wait_for(
                    _run(c, call), bound + MARGIN)
            except KmsError as e:
                result = e
            except TimeoutError:
                raise AssertionError(f"{call} still running after {bound + MARGIN} s"
                                     f" (its deadline is {bound} s)") from None
            return result, time.monotonic() - start, bound

    try:
        result, elapsed, bound = world.loop.run_until_complete(run())
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    note(f"{call} -> {result!r} in {elapsed:.2f} s (bound {bound:.2f} s)")
    event(f"{call.op}: {type(result).__name__}")
    assert elapsed <= bound + MARGIN
    if isinstance(result, KmsError):
        assert str(result).isprintable(), str(result)
        lines.lines.append(str(result))
    else:
        _check_result(call, result)
    for line in lines.lines:
        assert line.isprintable(), line
        assert len(line) < 2000, line
        for secret in secrets:  # no key material, not even a piece of it
            assert secret[:12] not in line, line

"""Realistic bugs in the rekey core, one at a time: the explorer must catch every one; the
hypothesis property tests are measured beside it (docs/protocol.md, "Mutants").

    python -m tests.gateway.mutants                   # every mutant
    python -m tests.gateway.mutants --only fresh-accept --examples 500

Each mutant is a small text patch on a copy of gateway/ (every patched text must occur
exactly once, so the mutants follow the code or fail loudly). On the copy, in a fresh
process each: the explorer at the CI bound, stopping at the first violation (caught, and the
length of its shortest trace), and the stateful property tests of both modes, derandomized,
without shrinking, until the first failure (caught, and how many examples that took, at most
--examples per mode).

The table, then as its last line one JSON object: mutants, caught_by_explorer,
caught_by_hypothesis. Exit status 0 only if the explorer caught every mutant.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    #: (file under gateway/core/, text, its replacement)
    patches: tuple[tuple[str, str, str], ...]


MUTANTS = (
    Mutant("unverified-accept", "the initiator installs and switches on an Accept whose key"
           " confirmation it does not verify",
           (("initiator.py", "        if not keys.confirm_ok(Purpose.CONFIRM_R, t, m.confirm):",
             "        if False:"),)),
    Mutant("accept-before-install", "the responder sends its Accept when it asks for its"
           " inbound key, not once the key is in",
           (("responder.py", "        return self._install(a.material)\n\n    def _accepted",
             "        return self._install(a.material) + [Send(a.accept)]\n\n"
             "    def _accepted"),)),
    Mutant("no-grace", "an inbound key is retired as soon as the peer moved on, without the"
           " grace",
           (("keyring.py", "            if e < epoch and key.retire_at is None:\n"
             "                key.retire_at = now + self.policy.grace",
             "            if e < epoch and key.retire_at is None:\n"
             "                key.retire_at = now"),)),
    Mutant("reused-key-id", "the responder accepts an Offer whose QKD key ID it used before",
           (("responder.py", "        reused = [k for k in o.key_ids if k in self.used]",
             "        reused: list[str] = []"),)),
    Mutant("epoch-reuse", "the initiator takes back the number of an exchange it gave up",
           (("link.py", "        if self.role is Role.INITIATOR and self.next_rekey_at is None:",
             "        if self.role is Role.INITIATOR and a is not None"
             " and a.epoch and a.epoch == self.max_epoch:\n"
             "            self.max_epoch -= 1\n"
             "        if self.role is Role.INITIATOR and self.next_rekey_at is None:"),)),
    Mutant("fresh-accept", "a repeated Offer gets a fresh Accept (new keys) rather than the"
           " same one",
           (("responder.py", "            return [Send(a.accept)] if self.state is"
             " State.ACCEPTED and a.accept else []",
             "            if self.state is State.ACCEPTED:\n"
             "                return self._respond(now, self._mutant_keys)\n"
             "            return []"),
            ("responder.py", "        o = need(a.offer, \"its Offer\")\n"
             "        if tuple(k.key_id for k in keys) != o.key_ids:",
             "        self._mutant_keys = keys\n"
             "        o = need(a.offer, \"its Offer\")\n"
             "        if tuple(k.key_id for k in keys) != o.key_ids:"))),
    Mutant("no-block-at-hard-lifetime", "past the hard lifetime the core drops its key but does"
           " not block the data plane",
           (("link.py", "            out += [Block(f\"epoch {o.ref.epoch} reached its hard"
             " lifetime\"),\n                    RetireOutbound(o.ref),\n",
             "            out += [\n"),)),
    Mutant("epoch-not-restored", "a restart does not restore the highest epoch number from"
           " the state file",
           (("link.py", "        self.max_epoch = snap.max_epoch",
             "        self.max_epoch = 0"),)),
    Mutant("commit-before-install", "the initiator sends its Commit before its own inbound key"
           " is in (for: skip the Commit's confirmation, see docs)",
           (("initiator.py", "        return self._install(a.material)\n\n"
             "    def _late_accept",
             "        return self._install(a.material) + [Send(a.commit)]\n\n"
             "    def _late_accept"),)),
    Mutant("failed-switch-ignored", "a failed switch of the outbound key is taken for a"
           " successful one",
           (("plane.py", "        a = self.attempt\n        why = f\"epoch {event.epoch}: could"
             " not switch to its key: {event.reason}\"",
             "        if self.state is State.ACTIVATING:\n"
             "            return self._activated(SinkActivated(event.epoch), now)\n"
             "        a = self.attempt\n        why = f\"epoch {event.epoch}: could"
             " not switch to its key: {event.reason}\""),)),
    Mutant("early-accept", "a repeated Offer is answered with the Accept while the inbound key"
           " is still being installed (a bug this core had)",
           (("responder.py", "if self.state is State.ACCEPTED and a.accept else []",
             "if a.accept else []"),)),
    Mutant("retire-kept-epoch", "an Offer for a later epoch makes the responder retire even the"
           " epoch the initiator still sends on",
           (("keyring.py", "            if e < epoch and e != keep and key.retire_at is None:",
             "            if e < epoch and key.retire_at is None:"),)),
)


def mutated(mutant: Mutant, into: Path) -> Path:
    """A tree in INTO where `gateway` is a patched copy and the rest links to the repo."""
    for entry in REPO.iterdir():
        if entry.name == "gateway":
            shutil.copytree(entry, into / "gateway",
                            ignore=shutil.ignore_patterns("__pycache__"))
        elif entry.name in ("common", "kdf", "kms", "tests", "ipsec", "tls"):
            (into / entry.name).symlink_to(entry)
    for name, old, new in mutant.patches:
        path = into / "gateway" / "core" / name
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{mutant.name}: the text to patch occurs {text.count(old)}"
                             f" times in {name}, not once")
        path.write_text(text.replace(old, new))
    return into


def examples_to_failure(machine: type[RuleBasedStateMachine], cap: int) -> int | None:
    """How many examples MACHINE runs until its first failure (None: none in CAP)."""
    runs = 0

    class Counting(machine):  # type: ignore[valid-type,misc]
        def __init__(self) -> None:
            nonlocal runs
            runs += 1
            super().__init__()

    try:
        run_state_machine_as_test(Counting, settings=settings(
            max_examples=cap, stateful_step_count=40, deadline=None, database=None,
            derandomize=True, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck)))
    except Exception:  # any failure: an invariant, convergence, an error
        return runs
    return None


def hypothesis_examples(cap: int) -> int | None:
    """Examples of both modes' property tests until the first failure (None: none)."""
    from tests.gateway.test_core_properties import FallbackWorld, QkdPqcWorld

    spent = 0
    for machine in (QkdPqcWorld, FallbackWorld):
        n = examples_to_failure(machine, cap)
        if n is not None:
            return spent + n
        spent += cap
    return None


def explorer_trace() -> int | None:
    """The explorer at the CI bound: the length of its shortest trace (None: no violation)."""
    from tests.gateway.explore import CI, Explorer

    res = Explorer(CI, stop_at_first=True).run()
    if res.violations:
        return len(res.trace) - 1
    return len(res.stuck) + len(res.continuation) - 1 if res.liveness_violations else None


def _in(tree: Path, call: str, timeout: float) -> int | None:
    """CALL (a function of this module) in a fresh process in TREE: its number, or None."""
    out = subprocess.run(
        [sys.executable, "-c", f"from tests.gateway.mutants import {call.split('(')[0]};"
         f" print('RESULT', {call})"],
        cwd=tree, capture_output=True, text=True, timeout=timeout, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{call} failed in {tree}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    value = line.split(" ", 1)[1]
    return None if value == "None" else int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.gateway.mutants",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="this mutant (repeatable)")
    parser.add_argument("--examples", type=int, default=1000,
                        help="property-test examples per mode before giving up (1000)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    rows = [f"| {'mutant':<26} | explorer (caught, trace length) | hypothesis (caught,"
            " examples needed) |", f"|{'-' * 28}|---|---|"]
    by_explorer = by_hypothesis = 0
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
            tree = mutated(m, Path(tmp))
            trace = _in(tree, "explorer_trace()", timeout=1800)
            examples = _in(tree, f"hypothesis_examples({args.examples})", timeout=3600)
        by_explorer += trace is not None
        by_hypothesis += examples is not None
        explorer = f"yes, {trace} steps" if trace else "NO"
        hypothesis = f"yes, {examples}" if examples else f"no, {2 * args.examples}"
        rows.append(f"| {m.name:<26} | {explorer} | {hypothesis} |")
        print(rows[-1], f"  ({m.what})", flush=True)
    print()
    print("\n".join(rows))
    print(json.dumps({"mutants": len(chosen), "caught_by_explorer": by_explorer,
                      "caught_by_hypothesis": by_hypothesis}))
    return 0 if by_explorer == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The rekey core's state diagram, generated from `TRANSITIONS` (Mermaid).

    python -m gateway.core.diagram      # prints the block docs/protocol.md embeds

Every state change the table allows is drawn; the table lists the rest too.
"""

from __future__ import annotations

from gateway.core.machine import TRANSITIONS, State


def mermaid() -> str:
    lines = ["stateDiagram-v2", f"    [*] --> {State.IDLE.value}"]
    seen: set[tuple[State, State, str]] = set()
    for t in TRANSITIONS:
        for a, b in t.edges:
            edge = (a, b, t.event.__name__)
            if edge not in seen:
                seen.add(edge)
                lines.append(f"    {a.value} --> {b.value}: {t.event.__name__}")
    return "\n".join(lines)


def table() -> str:
    rows = ["| state | event | handler | may lead to | what happens |", "|---|---|---|---|---|"]
    for t in TRANSITIONS:
        to = ", ".join(sorted({b.value for _, b in t.edges})) or "(stays)"
        rows.append(f"| {t.state.value if t.state else 'any'} | `{t.event.__name__}` |"
                    f" `{t.handler.__name__}` | {to} | {t.note} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print("```mermaid")
    print(mermaid())
    print("```")
    print()
    print(table())

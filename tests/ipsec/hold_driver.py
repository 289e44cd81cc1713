"""Drive one `ResponderHold` from stdin, inside a gateway's namespace (tests/ipsec/test_hold.py).

    ip netns exec GW python -m tests.ipsec.hold_driver LINK DEVICE MAX_TIME [MAX_PACKETS]

Commands, one per line: `hold`, `release`, `status`, `close`. Each answers one JSON line with
the time it completed, whether it holds and how many packet notices the queue's socket has
read ({"t": ..., "holding": ..., "seen": ...}); the log goes to stderr. MAX_PACKETS replaces
the hold's queue length (to see it overflow).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from ipsec.strongswan import hold as hold_module
from ipsec.strongswan.hold import HoldConfig, ResponderHold


async def main(link: str, device: str, max_time: float) -> None:
    hold = ResponderHold(link, HoldConfig(device=device, max_time=max_time))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while line := (await reader.readline()).decode().strip():
        if line == "hold":
            await hold.hold("test")
        elif line == "release":
            await hold.release("test")
        elif line == "close":
            await hold.close()
        print(json.dumps({"t": time.time(), "holding": hold.holding, "seen":
                          hold.sock.seen if hold.sock else None}), flush=True)
        if line == "close":
            return


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) > 4:
        hold_module.MAX_PACKETS = int(sys.argv[4])
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))

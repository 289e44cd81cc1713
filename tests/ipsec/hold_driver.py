"""Drive one `ResponderHold` from stdin, inside a gateway's namespace (tests/ipsec/test_hold.py).

    ip netns exec GW python -m tests.ipsec.hold_driver LINK DEVICE MAX_TIME

Commands, one per line: `hold`, `release`, `close`. Each answers one JSON line with the time
it completed ({"t": ..., "holding": ...}); the log goes to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

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
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))

"""The screenshots in docs/img/, taken from real sites in headless Chromium:

    python -m tests.screenshots [--out docs/img]

Two sites rekeying every 2 s for a few minutes with a KMS outage in between (so the plots
show a PQC-only span), then the dashboard of site A and a report of the period.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from tests.browser import Browser
from tests.gateway.sites import Sites
from tests.helpers import qkdgw_command

POLICY = {"interval": 2.0, "jitter": 0.2, "grace": 0.5, "hard_lifetime": 30.0,
          "mode": "pqc-fallback"}


async def shoot(sites: Sites, out: Path, report: Path) -> None:
    listen = yaml.safe_load(sites.config_path("a").read_text())["metrics"]["listen"]
    async with Browser(width=1280, height=900) as b:
        await b.load(f"http://{listen}/?seconds=300")
        await asyncio.sleep(1.5)
        await b.screenshot(out / "dashboard.png")
        await b.load(report.as_uri())
        await b.screenshot(out / "report.png")
        assert b.off_loopback() == [], b.off_loopback()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--seconds", type=float, default=150.0,
                        help="how long the sites run before the shots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, Sites(Path(tmp), POLICY).start() as sites:
        sites.wait_until("both sites on the same key", sites.converged)
        assert sites.sim is not None
        time.sleep(args.seconds * 0.4)
        sites.sim.admin("POST", "/admin/faults", {"kind": "unavailable",
                                                  "seconds": args.seconds * 0.2})
        time.sleep(args.seconds * 0.6)
        report = Path(tmp) / "report.html"
        subprocess.run([*qkdgw_command(), "report", "-c", str(sites.config_path("a")),
                        "--since", f"{int(args.seconds + 30)}s", "-o", str(report)],
                       check=True)
        asyncio.run(shoot(sites, args.out, report))
    print(f"wrote {args.out / 'dashboard.png'} and {args.out / 'report.png'}")


if __name__ == "__main__":
    main()

"""The UML harness itself: a guest loads its modules from what `user-mode-linux` installs and
nothing else of the host (a fresh machine has no /lib/modules), and leaves the host as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.uml import boot

#: Not in boot.MODULES: only the kernel's own request (/proc/sys/kernel/modprobe) loads it.
ON_DEMAND = "dummy"


def test_the_guest_loads_its_modules_and_those_the_kernel_asks_for(tmp_path: Path) -> None:
    if reason := boot.missing():
        pytest.skip(f"no User-Mode Linux: {reason}")
    assert ON_DEMAND not in boot.MODULES
    host_lib_modules = Path("/lib/modules").exists()
    script = ("ip link add va type veth peer name vb"
              f" && ip link add d0 type {ON_DEMAND}"
              " && cut -d' ' -f1 /proc/modules")
    run = boot.boot(["sh", "-c", script], tmp_path / "guest", timeout=120)
    assert run.returncode == 0, run.explain()
    assert (tmp_path / "guest" / "modules.log").read_text() == "", run.explain()
    loaded = set(run.stdout.split())
    assert {"veth", "esp4", "xfrm_user", "gcm", ON_DEMAND} <= loaded, run.stdout
    # The guest's root is the host's `/`, writable: its module tree must not land there.
    assert Path("/lib/modules").exists() == host_lib_modules
    assert not Path("/run/uml").exists()

"""Boot User-Mode Linux and run one command in it: a real Linux IPsec stack for the tests.

The host kernel here has no ESP; UML (Debian's `user-mode-linux`, a Linux 6.1 kernel run as
a process) has it as modules. The guest's root file system is the host's `/` (hostfs), so
it runs this checkout and this virtualenv as they are, and what it writes lands on the
host. One guest CPU; every program start costs it 60–170 ms: run whole scenarios in one
guest, in one Python process where possible.

    result = boot([sys.executable, "-m", "tests.ipsec.xfrm_world", ...], workdir)
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

UML = "linux.uml"
UML_MODULES = Path("/usr/lib/uml/modules")
REPO = Path(__file__).resolve().parents[2]
PRELOAD_SOURCE = Path(__file__).with_name("xstate_preload.c")

#: Loaded before the command runs: the first SA with a new algorithm otherwise waits
#: seconds on the kernel calling modprobe.
MODULES = ("esp4", "esp6", "xfrm_user", "veth", "gcm", "seqiv", "ctr", "ghash_generic",
           "sch_netem", "sch_prio", "cls_u32")

#: The guest's modules live in /usr/lib/uml/modules/VERSION, but modprobe looks in
#: /lib/modules/VERSION, and the guest's root is the host's `/` (hostfs, writable): a fresh
#: machine has no /lib/modules to mount over, and the guest must not create one on the host.
#: So the guest builds a module tree in its own /run (a tmpfs): /run/uml/lib/modules/VERSION
#: -> the UML modules, runs `modprobe -d /run/uml`, and points the kernel's own module loader
#: (/proc/sys/kernel/modprobe, also what iptables calls) at a wrapper that does the same.
MODULE_SETUP = (
    "mkdir -p /run/uml/lib/modules",
    'ln -s /usr/lib/uml/modules/"$(uname -r)" /run/uml/lib/modules/"$(uname -r)"',
    "printf '#!/bin/sh\\nexec /sbin/modprobe -d /run/uml \"$@\"\\n' > /run/uml/modprobe",
    "chmod 755 /run/uml/modprobe",
    "echo /run/uml/modprobe > /proc/sys/kernel/modprobe",
)

#: Guest memory: two daemons, the KMS simulator, the test driver, ping and tcpdump.
MEMORY = "1536M"


def missing() -> str | None:
    """Why UML cannot run here, or None."""
    if shutil.which(UML) is None:
        return "linux.uml not found (apt-get install user-mode-linux)"
    if not UML_MODULES.is_dir():
        return f"{UML_MODULES} missing (apt-get install user-mode-linux)"
    if shutil.which("cc") is None:
        return "no C compiler for the UML XSAVE shim (apt-get install gcc libc6-dev)"
    for tool in ("ip", "ping", "tcpdump", "modprobe", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 iputils-ping tcpdump kmod)"
    shm = Path("/dev/shm")  # noqa: S108 (where UML keeps the guest's memory; only checked here)
    if not shm.is_dir():
        return f"{shm} missing: UML keeps the guest's memory there"
    return None


def preload(cache: Path) -> Path:
    """The compiled XSAVE shim (see xstate_preload.c), built once per source version."""
    digest = hashlib.sha256(PRELOAD_SOURCE.read_bytes()).hexdigest()[:16]
    out = cache / f"xstate_preload-{digest}.so"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["cc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(tmp),
                        str(PRELOAD_SOURCE), "-ldl"], check=True, capture_output=True)
        tmp.replace(out)
    return out


@dataclass(frozen=True)
class GuestRun:
    returncode: int | None  # the command's exit status; None if the guest never reported
    workdir: Path
    seconds: float

    @property
    def stdout(self) -> str:
        return _read(self.workdir / "stdout")

    @property
    def stderr(self) -> str:
        return _read(self.workdir / "stderr")

    @property
    def console(self) -> str:
        return _read(self.workdir / "console.log")

    def explain(self) -> str:
        """Everything that helps when a guest run failed."""
        modules = _read(self.workdir / "modules.log")
        return (f"guest exit {self.returncode} after {self.seconds:.1f} s\n"
                + (f"--- modules that did not load\n{modules}" if modules else "")
                + f"--- stderr (tail)\n{self.stderr[-4000:]}\n"
                f"--- console (tail)\n{self.console[-2000:]}")


def boot(argv: list[str], workdir: Path, *, timeout: float, memory: str = MEMORY,
         env: dict[str, str] | None = None) -> GuestRun:
    """Boot a guest, run ARGV in it (cwd: the repository, as root), power off.

    WORKDIR (on the host) receives init.sh, console.log, stdout, stderr and exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    exports = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
               "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONUNBUFFERED": "1", **(env or {})}
    init = workdir / "init.sh"
    w = shlex.quote(str(workdir))
    init.write_text("\n".join([
        "#!/bin/sh",
        *(f"export {k}={shlex.quote(v)}" for k, v in exports.items()),
        "mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t tmpfs run /run",
        *MODULE_SETUP,
        "mkdir -p /run/netns",
        f"for m in {' '.join(MODULES)}; do /sbin/modprobe -d /run/uml $m"
        " || echo \"no module $m\"; done"
        f" > {w}/modules.log 2>&1",
        "ip link set lo up",
        f"cd {shlex.quote(str(REPO))}",
        f"{shlex.join(argv)} > {w}/stdout 2> {w}/stderr",
        f"echo $? > {w}/exit",
        "poweroff -f",
        "",
    ]))
    init.chmod(0o755)
    (workdir / "exit").unlink(missing_ok=True)
    cmd = [UML, f"mem={memory}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
           f"init={init}", "con=null", "con0=fd:0,fd:1"]
    host_env = {**os.environ, "LD_PRELOAD": str(preload(workdir.parent / ".uml-build"))}
    started = time.monotonic()
    with (workdir / "console.log").open("wb") as console:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, env=host_env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:  # timed out or interrupted: the guest goes too
            if proc.poll() is None:
                os.killpg(proc.pid, 9)  # the guest's processes are all in this group
                proc.wait()
    status = _read(workdir / "exit").strip()
    return GuestRun(int(status) if status.lstrip("-").isdigit() else None, workdir,
                    time.monotonic() - started)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


if __name__ == "__main__":  # python -m tests.uml.boot CMD...: try a command in a guest
    run = boot(sys.argv[1:], Path(tempfile.mkdtemp(prefix="uml-")), timeout=300)
    print(run.stdout, run.stderr, f"exit {run.returncode} in {run.seconds:.1f} s", sep="\n")

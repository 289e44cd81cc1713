"""Debian 13 ("trixie") file systems for the interoperability tests, built once per recipe.

The host is Debian 12 (strongSwan 5.9.8, OpenSSL 3.0, Python 3.11). The interop matrix
(docs/interop.md) also needs Debian 13's daemons: strongSwan 6.0.1, OpenSSL 3.5 (the
X25519MLKEM768 TLS group), stunnel 5.74 and Python 3.13. They run from a debootstrap'd root,
chrooted into a test's network namespace.

Debian 13 builds strongSwan without any ML-KEM provider (6.0.1 takes ML-KEM only from its
`ml`, botan or wolfssl plugins, or from OpenSSL on AWS-LC). The `strongswan` root therefore
also gets upstream's `ml` plugin, built from the very source Debian's packages come from (the
6.0.1 tarball in Debian's archive, checked against the SHA-256 its Sources index gives), and
installed next to Debian's plugins. That is what an operator on Debian 13 does too
(docs/strongswan.md).

    python -m tests.interop.roots [NAME...]     build what is missing (root; needs debootstrap)

Roots live in /var/cache/qkd-gateway/roots (QKDGW_ROOTS overrides), one directory per
recipe's digest, built in a scratch directory and renamed into place when complete, so a
build that fails or is interrupted leaves nothing a test would use. A root takes about two
minutes to build (downloads from the Debian mirror: QKDGW_MIRROR, default deb.debian.org).
(libreswan 5.2, for the interop matrix's next rows, conflicts with charon as a package, both
providing `ike-server`: it will need a root of its own.)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("QKDGW_ROOTS", "/var/cache/qkd-gateway/roots"))
MIRROR = os.environ.get("QKDGW_MIRROR", "http://deb.debian.org/debian")
SUITE = "trixie"

#: strongSwan's source as Debian 13 ships it (Sources of trixie and trixie-security, package
#: strongswan 6.0.1-6+deb13u7: Checksums-Sha256 of strongswan_6.0.1.orig.tar.bz2).
STRONGSWAN_SOURCE = "pool/updates/main/s/strongswan/strongswan_6.0.1.orig.tar.bz2"
STRONGSWAN_SOURCE_SHA256 = "212368cbc674fed31f3292210303fff06da8b90acad2d1387375ed855e6879c4"
SECURITY_MIRROR = os.environ.get("QKDGW_SECURITY_MIRROR", "http://deb.debian.org/debian-security")

#: Only what builds libstrongswan and its `ml` plugin (ML-KEM in C, no dependencies):
#: Debian's own plugins stay as they are.
ML_PLUGIN_BUILD = (
    "set -e; cd /build; tar xjf strongswan.tar.bz2; cd strongswan-6.0.1;"
    " ./configure --quiet --disable-defaults --enable-ml >/dev/null;"
    " make -s -j\"$(nproc)\" -C src/libstrongswan >/dev/null 2>&1;"
    " install -m 644 src/libstrongswan/plugins/ml/.libs/libstrongswan-ml.so"
    " /usr/lib/ipsec/plugins/;"
    " cd /; rm -rf /build"
)


@dataclass(frozen=True)
class Recipe:
    """A root: Debian packages, then commands run in it (chrooted, with the network)."""

    name: str
    packages: tuple[str, ...]
    build_packages: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()
    downloads: tuple[tuple[str, str, str], ...] = field(default=())  # (url, sha256, path in root)

    def digest(self) -> str:
        text = repr((SUITE, self.packages, self.build_packages, self.steps, self.downloads))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def path(self) -> Path:
        return CACHE / f"{SUITE}-{self.name}-{self.digest()}"


STRONGSWAN = Recipe(
    name="strongswan",
    packages=("strongswan-charon", "strongswan-swanctl", "libcharon-extra-plugins",
              "libstrongswan-standard-plugins", "libstrongswan-extra-plugins",
              "openssl", "stunnel4", "python3", "iproute2", "ca-certificates"),
    build_packages=("gcc", "make", "libc6-dev", "pkg-config", "bzip2"),
    steps=(ML_PLUGIN_BUILD,),
    downloads=((f"{SECURITY_MIRROR}/{STRONGSWAN_SOURCE}", STRONGSWAN_SOURCE_SHA256,
                "build/strongswan.tar.bz2"),),
)

RECIPES = {r.name: r for r in (STRONGSWAN,)}


def missing(recipe: Recipe) -> str | None:
    """Why RECIPE's root is not there to use, or None (the message says how to build it)."""
    if recipe.path().is_dir():
        return None
    return (f"the Debian 13 root '{recipe.name}' is not built ({recipe.path()}):"
            f" python -m tests.interop.roots {recipe.name} (./bootstrap test builds it)")


def chrooted(root: Path, command: str, *, binds: Sequence[tuple[Path, Path]] = ()) -> list[str]:
    """An argv: COMMAND (a shell command line) chrooted into ROOT, in a mount namespace of its
    own with ROOT's /proc, /sys and /dev (TUN devices), a tmpfs on /mnt, and each (directory
    on the host, path in ROOT) of BINDS; every mount is gone when COMMAND exits. Run it in the
    network namespace the command belongs in."""
    mounts = [f"mount -t proc proc {root}/proc", f"mount --rbind /sys {root}/sys",
              f"mount --rbind /dev {root}/dev", f"mount -t tmpfs tmpfs {root}/mnt"]
    for host, inside in binds:
        mounts += [f"mkdir -p {root}{inside}", f"mount --bind {host} {root}{inside}"]
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f"{' && '.join(mounts)} && exec chroot {root} {command}"]


def cannot_build() -> str | None:
    """Why no root can be built here, or None."""
    if os.geteuid() != 0:
        return "building a Debian root needs root (debootstrap, chroot)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (apt-get install debootstrap)"
    return None


@contextlib.contextmanager
def _mounted(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev in ROOT while packages install (their scripts expect them)."""
    done: list[Path] = []
    try:
        for src, dst, how in (("proc", "proc", ["-t", "proc"]), ("/sys", "sys", ["--rbind"]),
                              ("/dev", "dev", ["--rbind"])):
            target = root / dst
            subprocess.run(["mount", *how, src, str(target)], check=True)
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            subprocess.run(["umount", "-R", "-l", str(target)], check=False)


def _chroot(root: Path, script: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["chroot", str(root), "sh", "-c", script], check=True, env=env)


def _download(url: str, sha256: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 (a fixed https/http URL)
        data = response.read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise RuntimeError(f"{url}: SHA-256 {got}, expected {sha256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)


def build(recipe: Recipe, log: Path | None = None) -> Path:
    """RECIPE's root, built now unless it already is (one builder at a time per recipe)."""
    final = recipe.path()
    if final.is_dir():
        return final
    if reason := cannot_build():
        raise RuntimeError(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{recipe.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=CACHE))
        scratch.chmod(0o755)  # a machine's / (apt's _apt user reads its cache there)
        try:
            _build_into(recipe, scratch)
            scratch.rename(final)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)
    return final


def _build_into(recipe: Recipe, root: Path) -> None:
    print(f"roots: debootstrap {SUITE} into {root} ({MIRROR})", file=sys.stderr, flush=True)
    subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR],
                   check=True, stdout=subprocess.DEVNULL)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    for url, sha256, dest in recipe.downloads:
        _download(url, sha256, root / dest)
    # Nothing may start a service in the root (strongSwan's and libreswan's postinst try).
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    with _mounted(root):
        everything = " ".join(recipe.packages + recipe.build_packages)
        print(f"roots: apt-get install {everything}", file=sys.stderr, flush=True)
        _chroot(root, f"apt-get install -y -qq --no-install-recommends {everything} >/dev/null")
        for step in recipe.steps:
            _chroot(root, step)
        if recipe.build_packages:
            _chroot(root, "apt-get purge -y -qq --auto-remove "
                          f"{' '.join(recipe.build_packages)} >/dev/null")
        _chroot(root, "apt-get clean")
    policy.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.interop.roots",
        description="Build the Debian 13 roots the interoperability tests run daemons from.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"which roots (default: all): {', '.join(RECIPES)}")
    parser.add_argument("--print", action="store_true", help="only print each root's path")
    args = parser.parse_args(argv)
    if unknown := [n for n in args.names if n not in RECIPES]:
        parser.error(f"no root named {', '.join(unknown)} (there are: {', '.join(RECIPES)})")
    for name in args.names or list(RECIPES):
        recipe = RECIPES[name]
        if args.print:
            print(recipe.path())
            continue
        if reason := cannot_build():
            print(f"roots: {reason}", file=sys.stderr)
            return 2
        print(build(recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())

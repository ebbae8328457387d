"""The default guest: a Linux kernel and a busybox initramfs built from Debian packages.

The recipe lives in firmware/ at the top of the repository (config fragment,
patches, build scripts, /init).  A build is cached under
``$PYVMM_CACHE/guest/<key>/`` (default ``~/.cache/pyvmm``), where the key hashes
every file of that recipe plus the versions of the Debian packages it is built
from, so editing the recipe or upgrading a package builds a new guest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import PyvmmError

FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware"
APT_PACKAGES = FIRMWARE_DIR / "apt-packages.txt"
INSTALL_HINT = f"run `apt-get install $(cat {APT_PACKAGES})`"
# Debian packages whose contents go into the guest: their versions are part of the key.
SOURCE_PACKAGES = ("linux-source-6.1", "busybox-static")


class GuestBuildError(PyvmmError):
    """The guest kernel or initramfs is missing, or cannot be built."""


@dataclass(frozen=True)
class GuestPaths:
    bzimage: Path  # compressed kernel, Linux/x86 boot protocol
    vmlinux: Path  # uncompressed ELF with the PVH entry note
    initramfs: Path  # uncompressed newc cpio
    system_map: Path  # the kernel's symbols, to name a guest RIP (vmlinux is stripped)

    @classmethod
    def in_dir(cls, directory: Path) -> GuestPaths:
        return cls(directory / "bzImage", directory / "vmlinux", directory / "initramfs.cpio",
                   directory / "System.map")

    def exist(self) -> bool:
        return all(p.is_file() for p in (self.bzimage, self.vmlinux, self.initramfs))


def cache_root() -> Path:
    root = os.environ.get("PYVMM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "pyvmm"


def package_version(package: str) -> str | None:
    """The installed version of a Debian package, or None if it is not installed."""
    try:
        r = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
            capture_output=True, text=True, check=False,
        )
    except FileNotFoundError:
        raise GuestBuildError("dpkg-query was not found: the guest firmware is built from Debian packages, so build it on Debian or Ubuntu.") from None
    status, _, version = r.stdout.partition("\t")
    return version if r.returncode == 0 and status.endswith(" installed") else None


def missing_packages() -> list[str]:
    """The packages of firmware/apt-packages.txt that are not installed."""
    wanted = [line.strip() for line in APT_PACKAGES.read_text().splitlines()]
    return [p for p in wanted if p and not p.startswith("#") and package_version(p) is None]


def _recipe_files() -> list[Path]:
    return sorted(p for p in FIRMWARE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def cache_key() -> str:
    """sha256 over the firmware/ recipe and the versions of the source packages."""
    h = hashlib.sha256()
    for path in _recipe_files():
        data = path.read_bytes()
        h.update(f"{path.relative_to(FIRMWARE_DIR).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    for package in SOURCE_PACKAGES:
        version = package_version(package)
        if version is None:
            raise GuestBuildError(f"{package} is not installed: {INSTALL_HINT}.")
        h.update(f"{package}\0{version}\0".encode())
    return h.hexdigest()[:32]


def guest_dir(key: str | None = None) -> Path:
    return cache_root() / "guest" / (key or cache_key())


def find_guest() -> GuestPaths | None:
    """The cached guest for the current recipe, or None if it has not been built."""
    try:
        paths = GuestPaths.in_dir(guest_dir())
    except GuestBuildError:
        return None
    return paths if paths.exist() else None


def _run(argv: list[str], progress: bool) -> None:
    if progress:
        r = subprocess.run(argv, check=False)
        tail = ""
    else:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        tail = " Its last output: " + " | ".join((r.stdout + r.stderr).strip().splitlines()[-5:])
    if r.returncode != 0:
        raise GuestBuildError(f"{Path(argv[0]).name} failed with exit status {r.returncode}: rerun it by hand to see why.{tail}")


def build_guest(progress: bool = True) -> GuestPaths:
    """Build the guest into the cache (minutes) and return its paths.

    The build happens in a temporary directory next to the final one, which
    is renamed into place only when complete, so a half build is never found.
    """
    missing = missing_packages()
    if missing:
        raise GuestBuildError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}.")
    final = guest_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)
    try:
        _run([str(FIRMWARE_DIR / "build-kernel.sh"), str(tmp)], progress)
        _run([str(FIRMWARE_DIR / "build-initramfs.sh"), str(tmp / "initramfs.cpio")], progress)
        if not GuestPaths.in_dir(tmp).exist():
            raise GuestBuildError(f"the firmware build left no complete guest in {tmp}: rerun it with progress=True to see why.")
        try:
            tmp.rename(final)
        except OSError:
            if not GuestPaths.in_dir(final).exist():  # not just a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GuestPaths.in_dir(final)


def ensure_guest(progress: bool = True) -> GuestPaths:
    """The cached guest, built first if needed."""
    return find_guest() or build_guest(progress)

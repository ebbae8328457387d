"""The default guest: a Linux kernel, a busybox initramfs with the guest agent, and a
Debian root filesystem for sandboxes, all built from Debian packages.

The recipe lives in firmware/ at the top of the repository (config fragment,
patches, build scripts, /init, the agent, the rootfs package list).  The guest is
built in parts, each cached under ``$PYVMM_CACHE/guest/<part>-<key>/`` (default
``~/.cache/pyvmm``), where the key hashes only that part's own inputs (its files
of the recipe, the versions of the Debian packages it is made from, the keys of
the parts it contains), so editing /init rebuilds the initramfs (seconds) and
not the kernel (minutes):

- ``kernel``: bzImage, vmlinux, vmlinux.debug, System.map and config (Debian's
  linux-source-6.1);
- ``agent``: the static guest agent, ``pyvmm-agent`` (firmware/agent/, musl);
- ``initramfs``: busybox, /init and the agent as /sbin/pyvmm-agent;
- ``rootfs-tree``: the Debian tree (mmdebstrap), a tarball: the slow, networked step;
- ``rootfs``: that tree plus the agent as /usr/sbin/pyvmm-agent, an ext4 image (seconds).

The kernel and initramfs are the guest; the rootfs is optional for callers that
only boot the busybox guest (``find_guest`` does not need it).
"""

from __future__ import annotations

import functools
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


class GuestBuildError(PyvmmError):
    """The guest kernel, initramfs or rootfs is missing, or cannot be built."""


@dataclass(frozen=True)
class Part:
    """One separately cached piece of the guest: what goes into its key, how it is built."""
    name: str
    inputs: tuple[str, ...]  # globs under firmware/ ("**/*" for a whole folder)
    packages: tuple[str, ...] = ()  # Debian packages whose contents go into it
    contains: tuple[str, ...] = ()  # parts it is built from: their keys go into its key
    outputs: tuple[str, ...] = ()  # the files a complete build leaves in its directory


PARTS: dict[str, Part] = {p.name: p for p in (
    Part("kernel", ("build-kernel.sh", "kernel/microvm.config", "kernel/patches/*"),
         packages=("linux-source-6.1",),
         outputs=("bzImage", "vmlinux", "vmlinux.debug", "System.map", "config")),
    Part("agent", ("agent/**/*",), packages=("musl-tools",), outputs=("pyvmm-agent",)),
    Part("initramfs", ("build-initramfs.sh", "init"), packages=("busybox-static",),
         contains=("agent",), outputs=("initramfs.cpio",)),
    # The suite (bookworm) is written in build-rootfs.sh, so it is in the key.
    Part("rootfs-tree", ("build-rootfs.sh", "rootfs/**/*"), outputs=("rootfs.tar",)),
    Part("rootfs", ("build-rootfs-image.sh",), contains=("rootfs-tree", "agent"),
         outputs=("rootfs.ext4",)),
)}
GUEST_PARTS = ("kernel", "agent", "initramfs")  # what find_guest() needs
ROOTFS_PARTS = ("rootfs-tree", "rootfs")


@dataclass(frozen=True)
class GuestPaths:
    bzimage: Path  # compressed kernel, Linux/x86 boot protocol
    vmlinux: Path  # uncompressed ELF with the PVH entry note
    initramfs: Path  # uncompressed newc cpio
    system_map: Path  # the kernel's symbols, to name a guest RIP (vmlinux is stripped)
    rootfs: Path | None = None  # ext4 sandbox root (pyvmm.rootfs=), None if not built
    agent: Path | None = None  # the static guest agent (also inside initramfs and rootfs)
    # vmlinux with its symbol table (and frame pointers) for gdb; None for a hand-made guest
    vmlinux_debug: Path | None = None

    @classmethod
    def in_dir(cls, directory: Path) -> GuestPaths:
        """Every file of a guest in one directory (tests and hand-made guests)."""
        return cls(directory / "bzImage", directory / "vmlinux", directory / "initramfs.cpio",
                   directory / "System.map", directory / "rootfs.ext4", directory / "pyvmm-agent",
                   directory / "vmlinux.debug")

    def exist(self) -> bool:
        """The kernel and initramfs are there (the rootfs is optional)."""
        return all(p.is_file() for p in (self.bzimage, self.vmlinux, self.initramfs))


def cache_root() -> Path:
    root = os.environ.get("PYVMM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "pyvmm"


DPKG_STATUS = Path("/var/lib/dpkg/status")  # rewritten by every package install or removal


def package_version(package: str) -> str | None:
    """The installed version of a Debian package, or None if it is not installed."""
    try:
        stamp = DPKG_STATUS.stat().st_mtime_ns
    except OSError:
        stamp = None
    return _package_version(package, stamp)


@functools.lru_cache(maxsize=64)
def _package_version(package: str, dpkg_stamp: int | None) -> str | None:
    """package_version, asked of dpkg once per package and state of dpkg's database:
    find_guest() runs before every built-in-guest VM and needs five of them."""
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


def _input_files(part: Part) -> list[Path]:
    found: set[Path] = set()
    for pattern in part.inputs:
        found.update(p for p in FIRMWARE_DIR.glob(pattern)
                     if p.is_file() and "__pycache__" not in p.parts)
    return sorted(found)


def part_key(name: str) -> str:
    """sha256 over one part's recipe files, its package versions and the keys of the parts
    it contains, so a change reaches exactly the parts built from it."""
    part = PARTS[name]
    h = hashlib.sha256(f"pyvmm-guest-part\0{name}\0".encode())
    for path in _input_files(part):
        data = path.read_bytes()
        h.update(f"{path.relative_to(FIRMWARE_DIR).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    for package in part.packages:
        version = package_version(package)
        if version is None:
            raise GuestBuildError(f"{package} is not installed: {INSTALL_HINT}.")
        h.update(f"package\0{package}\0{version}\0".encode())
    for inner in part.contains:
        h.update(f"part\0{inner}\0{part_key(inner)}\0".encode())
    return h.hexdigest()[:32]


def part_dir(name: str) -> Path:
    return cache_root() / "guest" / f"{name}-{part_key(name)}"


def _complete(name: str, directory: Path) -> bool:
    return all((directory / f).is_file() for f in PARTS[name].outputs)


def _guest_paths(dirs: dict[str, Path]) -> GuestPaths:
    kernel = dirs["kernel"]
    rootfs = dirs.get("rootfs")
    return GuestPaths(kernel / "bzImage", kernel / "vmlinux",
                      dirs["initramfs"] / "initramfs.cpio", kernel / "System.map",
                      rootfs / "rootfs.ext4" if rootfs is not None else None,
                      dirs["agent"] / "pyvmm-agent", kernel / "vmlinux.debug")


def find_guest() -> GuestPaths | None:
    """The cached guest for the current recipe, or None if its kernel or initramfs has
    not been built; its rootfs is None if only that is missing."""
    try:
        dirs = {name: part_dir(name) for name in GUEST_PARTS}
        rootfs = part_dir("rootfs")
    except GuestBuildError:
        return None
    if not all(_complete(name, d) for name, d in dirs.items()):
        return None
    if _complete("rootfs", rootfs):
        dirs["rootfs"] = rootfs
    return _guest_paths(dirs)


def _run(argv: list[str], progress: bool) -> None:
    if progress:
        r = subprocess.run(argv, check=False)
        tail = ""
    else:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        tail = " Its last output: " + " | ".join((r.stdout + r.stderr).strip().splitlines()[-5:])
    if r.returncode != 0:
        script = next((a for a in argv if a.endswith(".sh")), argv[0])
        raise GuestBuildError(f"{Path(script).name} failed with exit status {r.returncode}: rerun it by hand to see why.{tail}")


def _build_commands(name: str, out: Path) -> list[list[str]]:
    """The firmware scripts that build part `name` into the empty directory out (the
    parts it contains are built already)."""
    fw = FIRMWARE_DIR
    if name == "kernel":
        return [[str(fw / "build-kernel.sh"), str(out)]]
    if name == "agent":
        script = fw / "agent" / "build.sh"
        if not script.is_file():
            raise GuestBuildError(f"{script} is missing: the guest agent cannot be built from this checkout.")
        return [["sh", str(script), str(out / "pyvmm-agent")]]
    agent = str(part_dir("agent") / "pyvmm-agent")
    if name == "initramfs":
        return [[str(fw / "build-initramfs.sh"), str(out / "initramfs.cpio"), agent]]
    if name == "rootfs-tree":
        return [[str(fw / "build-rootfs.sh"), str(out / "rootfs.tar")]]
    if name == "rootfs":
        tree = str(part_dir("rootfs-tree") / "rootfs.tar")
        return [[str(fw / "build-rootfs-image.sh"), tree, agent, str(out / "rootfs.ext4")]]
    raise KeyError(name)


def build_part(name: str, progress: bool = True, force: bool = False) -> Path:
    """Part `name` in the cache, built (into a temporary directory renamed into place
    when complete, so a half build is never found) if missing or if force."""
    final = part_dir(name)
    if not force and _complete(name, final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)
    try:
        for argv in _build_commands(name, tmp):
            _run(argv, progress)
        if not _complete(name, tmp):
            raise GuestBuildError(f"the {name} build left no complete {name} in {tmp}: rerun it with progress=True to see why.")
        _install(name, tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _install(name: str, tmp: Path, final: Path) -> None:
    """Rename the finished build tmp to final, replacing an older build of the same key."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        try:
            final.rename(old / "build")
        except OSError:
            pass  # a concurrent build moved it first
    try:
        tmp.rename(final)
    except OSError:
        if not _complete(name, final):  # not just a concurrent build that won
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _build(parts: tuple[str, ...], progress: bool, force: bool) -> GuestPaths:
    missing = missing_packages()
    if missing:
        raise GuestBuildError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}.")
    dirs = {name: build_part(name, progress, force) for name in parts}
    return _guest_paths(dirs)


def build_guest(progress: bool = True, rootfs: bool = True) -> GuestPaths:
    """Build every part of the guest again (minutes), the rootfs too unless rootfs=False,
    and return its paths."""
    return _build(GUEST_PARTS + (ROOTFS_PARTS if rootfs else ()), progress, force=True)


def ensure_guest(progress: bool = True, rootfs: bool = True) -> GuestPaths:
    """The cached guest, each missing part built first (the rootfs too unless
    rootfs=False: `pyvmm run` needs only the kernel and initramfs)."""
    found = find_guest()
    if found is not None and (found.rootfs is not None or not rootfs):
        return found
    return _build(GUEST_PARTS + (ROOTFS_PARTS if rootfs else ()), progress, force=False)

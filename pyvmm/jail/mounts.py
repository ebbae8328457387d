"""What the jail's root holds, as a plan (data) and the code that carries it out.

The jail mirrors host paths: every file or directory it holds is at the same path as on
the host, bound read-only (the VM's writable disks read-write), with the host's symlinks
on the way recreated (/lib -> usr/lib...).  So neither the interpreter's library paths nor
the VMM's arguments need rewriting.  Binds live only in the jail's mount namespace: the
jail directory on the host holds empty mount points, nothing to unmount afterwards.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.errors import PyvmmError
from pyvmm.jail import syscalls as sc


class MountError(PyvmmError):
    pass


@dataclass(frozen=True)
class Bind:
    path: str                # absolute, symlink-free host path, bound at the same jail path
    read_only: bool = True
    directory: bool = False


@dataclass(frozen=True)
class Device:
    path: str
    major: int
    minor: int


@dataclass
class MountPlan:
    links: list[tuple[str, str]] = field(default_factory=list)   # (jail path, link target)
    binds: list[Bind] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    proc: bool = True        # /proc, hidepid=invisible,subset=pid: the VMM's own processes

    def covered(self, path: str) -> bool:
        """path is visible through a directory bind already."""
        return any(b.directory and (path == b.path or path.startswith(b.path.rstrip("/") + "/"))
                   for b in self.binds)

    def add(self, path: str, read_only: bool = True, *, resolve=None, is_dir=None) -> None:
        """Make host `path` (file or directory) visible in the jail at the same path.
        resolve and is_dir stand in for the host's file system in tests."""
        links, real = (resolve or host_chain)(path)
        for link in links:
            if link not in self.links and not self.covered(link[0]):
                self.links.append(link)
        if self.covered(real):
            if not read_only:
                raise MountError(f"{path} must be writable in the jail but lies in a "
                                 "read-only part of it (the Python prefix or the pyvmm package)")
            return
        for i, old in enumerate(self.binds):
            if old.path == real:
                if old.read_only and not read_only:
                    self.binds[i] = Bind(real, False, old.directory)
                return
        directory = (is_dir or os.path.isdir)(real)
        if directory:                # a new directory hides the binds under it: drop them
            self.binds = [b for b in self.binds if not b.path.startswith(real + "/")]
            self.links = [l for l in self.links if not l[0].startswith(real + "/")]
        self.binds.append(Bind(real, read_only, directory))

    def ordered_binds(self) -> list[Bind]:
        return sorted(self.binds, key=lambda b: b.path.count("/"))


def host_chain(path: str) -> tuple[list[tuple[str, str]], str]:
    """The symlinks met resolving absolute `path` on the host, and where it ends."""
    links: list[tuple[str, str]] = []
    todo = [p for p in path.split("/") if p][::-1]
    current = "/"
    hops = 0
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > 40:
                raise MountError(f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            links.append((candidate, target))
            if target.startswith("/"):
                current = "/"
            todo.extend([p for p in target.split("/") if p][::-1])
        else:
            current = candidate
    return links, current


# -- what the interpreter needs ---------------------------------------------------------------

# Extension modules of the standard library pyvmm never loads (GUI, terminals, tests,
# NIS...): their libraries stay out of the jail.
UNNEEDED_MODULES = ("_tkinter", "_curses", "readline", "_test", "xxlimited", "_xxtestfuzz",
                    "_ctypes_test", "nis", "ossaudiodev", "spwd", "_dbm", "_gdbm", "_crypt",
                    "_sqlite3", "audioop", "_xxsubinterpreters")


def python_paths() -> list[str]:
    """Directories the VMM's interpreter imports from: the prefixes and the pyvmm package."""
    import pyvmm
    package = os.path.dirname(os.path.abspath(pyvmm.__file__))
    out = []
    for p in (sys.base_prefix, sys.prefix, package):
        p = os.path.realpath(p)
        if p not in out:
            out.append(p)
    return out


def shared_objects() -> list[str]:
    """The interpreter, the pyvmm extension and the stdlib extension modules it may load."""
    import sysconfig

    import pyvmm
    objects = [os.path.realpath(sys.executable)]
    package = Path(pyvmm.__file__).parent
    objects += [str(p) for p in package.glob("*.so")]
    dynload = Path(sysconfig.get_paths()["platstdlib"]) / "lib-dynload"
    objects += [str(p) for p in sorted(dynload.glob("*.so"))
                if not p.name.startswith(UNNEEDED_MODULES)]
    try:
        import _cffi_backend
        objects.append(_cffi_backend.__file__)
    except ImportError:
        pass
    return objects


def parse_ldd(text: str) -> list[str]:
    libs: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if "=>" in line:
            path = line.split("=>", 1)[1].split("(")[0].strip()
        elif line.startswith("/") and "(" in line:
            path = line.split()[0]
        else:
            continue
        if path.startswith("/") and path not in libs:
            libs.append(path)
    return libs


def shared_libraries(cache_dir: str | None = None) -> list[str]:
    """The shared libraries those objects load, from ldd (~0.3-0.5 s here), remembered in
    cache_dir/ldd-<key>.json, keyed by each object's path, inode, size and mtime: a new
    dependency comes with a changed object.  The symlinks to the libraries are followed
    afresh on every jail (host_chain), so a library upgraded in place is found too."""
    import hashlib
    import json
    objects = shared_objects()
    key = hashlib.sha256()
    for path in objects:
        st = os.stat(path)
        key.update(f"{path}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cached = os.path.join(cache_dir, f"ldd-{key.hexdigest()[:32]}.json") if cache_dir else None
    if cached is not None:
        try:
            with open(cached) as f:
                libs = json.load(f)
            if all(os.path.exists(lib) for lib in libs):
                return libs
        except (OSError, ValueError):
            pass
    done = subprocess.run(["ldd", *objects], capture_output=True, text=True)
    libs = parse_ldd(done.stdout)
    if cached is not None:
        tmp = f"{cached}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(libs, f)
        os.replace(tmp, cached)
    return libs


def interpreter_plan(plan: MountPlan, cache_dir: str | None = None) -> MountPlan:
    for path in python_paths():
        plan.add(path)
    libs = shared_libraries(cache_dir)
    for lib in libs:
        plan.add(lib)
    # glibc dlopens libgcc_s when a thread exits through pthread_exit (what Python does
    # to a daemon thread at interpreter shutdown): ldd cannot see it, and without it the
    # VMM aborts on its way out ("libgcc_s.so.1 must be installed for pthread_exit").
    for lib in libs:
        if os.path.basename(lib).startswith("libc.so."):
            gcc_s = os.path.join(os.path.dirname(lib), "libgcc_s.so.1")
            if os.path.exists(gcc_s):
                plan.add(gcc_s)
    if os.path.exists("/etc/ld.so.cache"):
        plan.add("/etc/ld.so.cache")
    from pyvmm.pvm import PVM_MODULE_PATH
    if PVM_MODULE_PATH.exists():           # how pyvmm knows it runs on KVM PVM
        plan.add(str(PVM_MODULE_PATH))
    return plan


# -- device nodes -----------------------------------------------------------------------------

DEV_KVM = Device("/dev/kvm", 10, 232)
DEV_TUN = Device("/dev/net/tun", 10, 200)


def misc_minor(name: str, text: str | None = None) -> int | None:
    """A misc device's minor number from /proc/misc ('257 userfaultfd')."""
    if text is None:
        try:
            text = Path("/proc/misc").read_text()
        except OSError:
            return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == name and parts[0].isdigit():
            return int(parts[0])
    return None


def devices(misc: str | None = None) -> list[Device]:
    """/dev/kvm, /dev/net/tun, and /dev/userfaultfd when the host has it: nothing else
    (Python gets its randomness from getrandom(), and the VMM needs no /dev/null)."""
    out = [DEV_KVM, DEV_TUN]
    uffd = misc_minor("userfaultfd", misc)
    if uffd is not None:
        out.append(Device("/dev/userfaultfd", 10, uffd))
    return out


# -- carrying it out (in the jail's process, as root, in its new mount namespace) -------------

def _safe_makedirs(root: str, path: str) -> str:
    """mkdir -p root+path, refusing symlinks on the way (the jail root is the jailed
    user's: never follow what it could have left there)."""
    current = root
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise MountError(f"{current} is in the way of a jail mount point (not a directory)")
    return current


def _mount_point(root: str, bind: Bind) -> str:
    parent = _safe_makedirs(root, os.path.dirname(bind.path))
    target = os.path.join(parent, os.path.basename(bind.path))
    if bind.directory:
        return _safe_makedirs(root, bind.path)
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
    except OSError as exc:
        raise MountError(f"cannot make the mount point {target}: {exc.strerror}") from None
    return target


def carry_out(plan: MountPlan, root: str, uid: int, gid: int) -> None:
    """Bind the jail root on itself and fill it (binds, /dev, /proc), then pivot_root into
    it and detach the host's root.  The caller has unshared its mount namespace."""
    root = os.path.realpath(root)
    sc.mount(None, "/", None, sc.MS_SLAVE | sc.MS_REC)      # nothing goes back to the host
    sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC)      # pivot_root wants a mount point
    for link, target in plan.links:
        parent = _safe_makedirs(root, os.path.dirname(link))
        where = os.path.join(parent, os.path.basename(link))
        if os.path.islink(where) and os.readlink(where) == target:
            continue
        if os.path.lexists(where):
            raise MountError(f"{where} is in the way of the host's symlink {link} -> {target}")
        os.symlink(target, where)
    for bind in plan.ordered_binds():
        target = _mount_point(root, bind)
        sc.mount(bind.path, target, None, sc.MS_BIND)
        flags = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV
        if bind.read_only:
            flags |= sc.MS_RDONLY
        sc.mount(None, target, None, flags)
    dev = _safe_makedirs(root, "/dev")
    sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=755,size=64k")
    for node in plan.devices:
        where = _safe_makedirs(root, os.path.dirname(node.path))
        where = os.path.join(where, os.path.basename(node.path))
        os.mknod(where, stat.S_IFCHR | 0o600, os.makedev(node.major, node.minor))
        os.chown(where, uid, gid)
    if plan.proc:
        proc = _safe_makedirs(root, "/proc")
        flags = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
        try:
            sc.mount("proc", proc, "proc", flags, "hidepid=invisible,subset=pid")
        except OSError:                    # kernels before 5.8
            sc.mount("proc", proc, "proc", flags, "hidepid=2")
    os.chown(root, uid, gid)               # the VMM makes its sockets and files here
    os.chmod(root, 0o755)
    os.chdir(root)
    sc.pivot_root(".", ".")                # the host's root is now stacked under ours...
    sc.umount2(".", sc.MNT_DETACH)         # ...and gone
    os.chdir("/")

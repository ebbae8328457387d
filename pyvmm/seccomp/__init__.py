"""seccomp filters for pyvmm's threads: the policy (which system calls each thread may
make) is JSON (pyvmm/seccomp/default.json, or the user's --seccomp-filter FILE), the
mechanism is C (csrc/seccomp.c, libseccomp).  docs/seccomp.md has the tables and why.

Each pyvmm thread calls enter_thread(kind, policy) as it starts, before it serves:
the filter goes on that thread only (no TSYNC) and stays for its life.  A thread
created later by a filtered thread inherits its creator's filter too (filters stack:
a call must pass both), which is why the "api" list holds what the threads it starts
need, and why the main thread of `pyvmm run` filters itself last.

libseccomp is called from our own cffi extension: Debian's python3-seccomp binding
is built for the system Python, not the interpreter pyvmm runs on (pyenv's 3.11 here),
and a pip build of it needs Cython and the libseccomp sources.  libseccomp does the
parts that are easy to get wrong by hand: the architecture check, the x32 ABI, the
64-bit argument comparisons, and the BPF layout.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import termios
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvmm.errors import PyvmmError

DEFAULT_FILTER = Path(__file__).with_name("default.json")
THREAD_KINDS = ("vcpu", "io", "api", "console", "metrics", "uffd", "main")
ENTRY_KEYS = {"include", "syscalls", "ioctl", "socket", "open", "comment"}
OPEN_MODES = ("read-only", "any")
FAMILIES = {name: getattr(socket, name) for name in
            ("AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_VSOCK")}
# Calls whose arguments we always filter, so a policy cannot allow them bare.
ARGUMENT_FILTERED = {"ioctl": "ioctl", "socket": "socket", "openat": "open", "open": "open",
                     "clone3": "syscalls (it always fails with ENOSYS)"}
CLONE_THREAD = 0x00010000
PR_SET_NAME, PR_SET_NO_NEW_PRIVS, SECCOMP_SET_MODE_FILTER = 15, 38, 1
O_WRITE_BITS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# A development hook: PYVMM_SECCOMP_DEV=log (filters log instead of trapping: for
# recording allow lists from dmesg) or forbid:<kind> (that thread makes a forbidden
# call as soon as its filter is on: the tests of the SIGSYS line).  Read from the
# environment once; see docs/seccomp.md for why this is safe to leave in.
DEV_ENV = "PYVMM_SECCOMP_DEV"
FORBIDDEN_TEST_CALL = "getppid"


class SeccompError(PyvmmError):
    """A filter file that is not valid, or a filter the kernel refused."""


def _ioctl_numbers() -> dict[str, int]:
    """Every ioctl request pyvmm makes, by name, from the modules that make them."""
    from pyvmm.devices.virtio import net
    from pyvmm.kvm import lib
    from pyvmm.snapshot import uffd
    numbers = {name: getattr(lib, name) for name in dir(lib)
               if name.startswith("KVM_") and name.isupper() and
               not name.startswith(("KVM_CAP_", "KVM_MEM_", "KVM_IRQCHIP_", "KVM_IRQFD_FLAG",
                                    "KVM_IOEVENTFD_FLAG", "KVM_VCPUEVENT", "KVM_CLOCK_",
                                    "KVM_DIRTY_LOG_", "KVM_PIT_", "KVM_NR_", "KVM_API_VERSION",
                                    "KVM_EXIT_", "KVM_SYSTEM_EVENT", "KVM_INTERNAL_ERROR"))
               and isinstance(getattr(lib, name), int)}
    from pyvmm.devices import disk
    numbers["BLKGETSIZE64"] = disk.BLKGETSIZE64
    numbers.update(TUNSETIFF=net.TUNSETIFF, TUNSETOFFLOAD=net.TUNSETOFFLOAD,
                   TUNSETVNETHDRSZ=net.TUNSETVNETHDRSZ)
    numbers.update({name: getattr(uffd, name) for name in dir(uffd)
                    if name.startswith(("UFFDIO_", "USERFAULTFD_IOC")) and
                    isinstance(getattr(uffd, name), int)})
    numbers.update(TCGETS=termios.TCGETS, TCSETS=termios.TCSETS, TCSETSW=termios.TCSETSW,
                   TCSETSF=termios.TCSETSF, FIONBIO=termios.FIONBIO,
                   FIONREAD=termios.FIONREAD, TIOCGWINSZ=termios.TIOCGWINSZ)
    return numbers


@dataclass
class ThreadFilter:
    kind: str
    syscalls: dict[str, str] = field(default_factory=dict)   # name -> why
    ioctls: dict[str, int] = field(default_factory=dict)     # request name -> number
    families: list[str] = field(default_factory=list)
    open: str | None = None

    def rules(self) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
        """(syscall number, errno or 0 to allow, [(arg, op, a, b)]) for csrc/seccomp.c."""
        from pyvmm.kvm import lib
        out: list[tuple[int, int, list[tuple[int, int, int, int]]]] = []

        def nr(name: str) -> int:
            number = lib.pv_seccomp_resolve(name.encode())
            if number < 0:
                raise SeccompError(f"seccomp filter, thread {self.kind}: no system call "
                                   f"named {name!r} on this architecture")
            return number
        for name in self.syscalls:
            if name == "clone":          # threads only: never a new process
                out.append((nr(name), 0, [(0, lib.PV_SC_MASKED_EQ, CLONE_THREAD, CLONE_THREAD)]))
            elif name == "clone3":       # its flags are in memory, out of BPF's reach:
                out.append((nr(name), errno.ENOSYS, []))   # glibc falls back to clone
            elif name == "prctl":        # naming a thread; libseccomp's no_new_privs
                for option in (PR_SET_NAME, PR_SET_NO_NEW_PRIVS):
                    out.append((nr(name), 0, [(0, lib.PV_SC_EQ, option, 0)]))
            elif name == "seccomp":      # a thread adding its own filter (only narrows)
                out.append((nr(name), 0, [(0, lib.PV_SC_EQ, SECCOMP_SET_MODE_FILTER, 0)]))
            else:
                out.append((nr(name), 0, []))
        for number in sorted(set(self.ioctls.values())):
            out.append((nr("ioctl"), 0, [(1, lib.PV_SC_MASKED_EQ, 0xFFFFFFFF, number)]))
        for family in self.families:
            out.append((nr("socket"), 0, [(0, lib.PV_SC_EQ, FAMILIES[family], 0)]))
        if self.open is not None:
            for name in ("openat", "open"):
                if self.open == "any":
                    out.append((nr(name), 0, []))
                else:
                    flags_arg = 2 if name == "openat" else 1
                    out.append((nr(name), 0, [(flags_arg, lib.PV_SC_MASKED_EQ,
                                               O_WRITE_BITS, 0)]))
        return out


@dataclass
class Policy:
    """A whole filter file, parsed and checked: one ThreadFilter per thread kind."""
    source: str
    threads: dict[str, ThreadFilter]
    _compiled: dict[str, Any] = field(default_factory=dict, repr=False)

    def compiled(self, kind: str) -> tuple[Any, int]:
        """The rule array for csrc/seccomp.c, built once per kind (then reused by
        every thread of that kind, so no allocation happens under a filter)."""
        if kind not in self._compiled:
            from pyvmm.kvm import ffi
            rules = self.threads[kind].rules()
            array = ffi.new("struct pv_sc_rule[]", max(1, len(rules)))
            for slot, (number, err, cmps) in zip(array, rules):
                slot.nr, slot.errno_value, slot.ncmp = number, err, len(cmps)
                for c, (arg, op, a, b) in enumerate(cmps):
                    slot.cmp[c].arg, slot.cmp[c].op = arg, op
                    slot.cmp[c].a, slot.cmp[c].b = a, b
            self._compiled[kind] = (array, len(rules))
        return self._compiled[kind]

    def compile_all(self) -> "Policy":
        for kind in self.threads:
            self.compiled(kind)
        return self


def _fail(source: str, message: str) -> SeccompError:
    return SeccompError(f"seccomp filter {source}: {message}")


def parse(data: Any, source: str = "<filter>") -> Policy:
    """Check a filter's JSON (already decoded) and return its Policy; SeccompError
    with one line saying what is wrong otherwise."""
    from pyvmm.kvm import lib
    if not isinstance(data, dict) or not isinstance(data.get("threads"), dict):
        raise _fail(source, 'expected an object with a "threads" object')
    unknown = set(data) - {"threads", "groups", "version", "comment"}
    if unknown:
        raise _fail(source, f"unknown key {sorted(unknown)[0]!r}")
    groups = data.get("groups", {})
    if not isinstance(groups, dict):
        raise _fail(source, '"groups" must be an object')
    ioctl_names = _ioctl_numbers()
    threads: dict[str, ThreadFilter] = {}
    for kind in THREAD_KINDS:
        if kind not in data["threads"]:
            raise _fail(source, f"no filter for the {kind!r} thread (need all of "
                        f"{', '.join(THREAD_KINDS)})")
    for kind in data["threads"]:
        if kind not in THREAD_KINDS:
            raise _fail(source, f"unknown thread {kind!r} (known: {', '.join(THREAD_KINDS)})")
    for kind in THREAD_KINDS:
        result = ThreadFilter(kind)
        entries = [(f"thread {kind}", data["threads"][kind])]
        seen_groups: set[str] = set()
        while entries:
            where, entry = entries.pop(0)
            if not isinstance(entry, dict):
                raise _fail(source, f"{where} must be an object")
            bad = set(entry) - ENTRY_KEYS
            if bad:
                raise _fail(source, f"{where}: unknown key {sorted(bad)[0]!r}")
            include = entry.get("include", [])
            if not isinstance(include, list) or not all(isinstance(g, str) for g in include):
                raise _fail(source, f"{where}: \"include\" must be a list of group names")
            for group in include:
                if group not in groups:
                    raise _fail(source, f"{where} includes unknown group {group!r}")
                if group not in seen_groups:
                    seen_groups.add(group)
                    entries.append((f"group {group}", groups[group]))
            syscalls = entry.get("syscalls", {})
            if isinstance(syscalls, list) and all(isinstance(n, str) for n in syscalls):
                syscalls = {name: "" for name in syscalls}
            if not isinstance(syscalls, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in syscalls.items()):
                raise _fail(source, f"{where}: \"syscalls\" must map names to reasons")
            for name, why in syscalls.items():
                if name in ARGUMENT_FILTERED and name != "clone3":
                    raise _fail(source, f"{where}: {name} is allowed only through "
                                f"\"{ARGUMENT_FILTERED[name]}\", with its arguments checked")
                if lib.pv_seccomp_resolve(name.encode()) < 0:
                    raise _fail(source, f"{where}: no system call named {name!r}")
                result.syscalls.setdefault(name, why)
            ioctls = entry.get("ioctl", {})
            if isinstance(ioctls, list) and all(isinstance(n, str) for n in ioctls):
                ioctls = {name: "" for name in ioctls}
            if not isinstance(ioctls, dict):
                raise _fail(source, f"{where}: \"ioctl\" must map request names to reasons")
            for name in ioctls:
                if not isinstance(name, str):
                    raise _fail(source, f"{where}: ioctl names must be strings")
                if name in ioctl_names:
                    result.ioctls[name] = ioctl_names[name]
                else:
                    try:
                        number = int(name, 0)
                    except ValueError:
                        raise _fail(source, f"{where}: unknown ioctl {name!r} (a name pyvmm "
                                    "uses, or a number such as \"0xae80\")") from None
                    if not 0 <= number <= 0xFFFFFFFF:
                        raise _fail(source, f"{where}: ioctl number {name} out of range")
                    result.ioctls[name] = number
            families = entry.get("socket", [])
            if not isinstance(families, list) or not all(
                    isinstance(f, str) and f in FAMILIES for f in families):
                raise _fail(source, f"{where}: \"socket\" must be a list of "
                            f"{', '.join(FAMILIES)}")
            result.families += [f for f in families if f not in result.families]
            mode = entry.get("open")
            if mode is not None:
                if not isinstance(mode, str) or mode not in OPEN_MODES:
                    raise _fail(source, f"{where}: \"open\" must be one of "
                                f"{', '.join(OPEN_MODES)}")
                if result.open != "any":
                    result.open = mode
        threads[kind] = result
    return Policy(source, threads)


def load(path: str | os.PathLike | None = None) -> Policy:
    """The default filter (None) or a filter file, parsed, checked and compiled."""
    source = str(path) if path is not None else "default"
    try:
        text = Path(path or DEFAULT_FILTER).read_text()
    except OSError as exc:
        raise _fail(source, f"cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _fail(source, "it is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _fail(source, f"not valid JSON: {exc}") from None
    return parse(data, source).compile_all()


_default: Policy | None = None
_default_lock = threading.Lock()


def resolve(setting: "bool | str | os.PathLike | Policy | None") -> Policy | None:
    """What MicroVM(seccomp=...) and the CLI take: True (the default filter), False or
    None (no filter), a Policy, or a filter file's path."""
    global _default
    if setting is None or setting is False:
        return None
    # The SIGSYS handler and libseccomp's probe of the kernel, here on the caller's
    # (unfiltered) thread: a thread under a filter could not do either.
    prepare()
    preload()
    if isinstance(setting, Policy):
        return setting
    if setting is True:
        with _default_lock:
            if _default is None:
                _default = load()
            return _default
    return load(setting)


# What a VMM thread may import late (a traceback's source lines, snapshot code behind
# an API request, the terminal modules of the stdin reader): imported before any filter
# goes on, so that a run never depends on the read-only opens the filters still allow.
PRELOAD = ("traceback", "linecache", "tokenize", "json", "logging", "logging.handlers",
           "termios", "tty", "uuid", "selectors", "socketserver", "pyvmm.snapshot",
           "pyvmm.snapshot.format", "pyvmm.snapshot.uffd", "pyvmm.telemetry",
           "pyvmm.devices.vsock_uds", "pyvmm.devices.virtio.chain", "pyvmm.host_files")
_preloaded = False


def preload() -> None:
    global _preloaded
    if _preloaded:
        return
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    _preloaded = True


def _dev_setting() -> tuple[bool, str | None]:
    value = os.environ.get(DEV_ENV, "")
    if value == "log":
        return True, None
    if value.startswith("forbid:"):
        return False, value[len("forbid:"):]
    return False, None


_LOG_ONLY, _FORBID = _dev_setting()


def enter_thread(kind: str, policy: Policy | None, name: str | None = None) -> None:
    """Called by a pyvmm thread as it starts: name it (pv-<name>, what top and the
    SIGSYS line show), then put the policy's filter for kind on it.  Nothing without
    a policy but the name."""
    from pyvmm.kvm import lib
    lib.pv_set_thread_name((name or kind)[:15].encode())
    if policy is None:
        return
    array, count = policy.compiled(kind)
    rc = lib.pv_seccomp_install(array, count, int(_LOG_ONLY))
    if rc < 0:
        raise SeccompError(f"cannot install the seccomp filter of the {kind} thread: "
                           f"{os.strerror(-rc)}")
    if _FORBID == kind:
        os.getppid()            # FORBIDDEN_TEST_CALL: the process ends here


def prepare() -> None:
    """Install the SIGSYS handler and the syscall name table (done by the first
    filter anyway; callers that filter from a signal-sensitive place do it first)."""
    from pyvmm.kvm import lib
    rc = lib.pv_seccomp_prepare()
    if rc < 0:
        raise SeccompError(f"cannot install the SIGSYS handler: {os.strerror(-rc)}")

"""`pyvmm jail`: Firecracker's jailer for pyvmm.

The jailer process stays outside the jail as a small supervisor: it prepares the jail
(directories, cgroups, the mount plan), forks the VMM's process, waits for it, forwards
SIGTERM/SIGHUP to it, reports how it ended (an OOM kill in its cgroup by name) and
removes its cgroups.  The forked process does the rest of Firecracker's steps on itself:
joins the cgroups, sets the rlimits, joins the network namespace, unshares the mount
namespace and pivot_roots into the jail, closes every other file descriptor, drops to
uid:gid with no supplementary groups and PR_SET_NO_NEW_PRIVS, and execs the interpreter
on `pyvmm <args>` with a cleared environment.
"""
from __future__ import annotations

import importlib
import os
import re
import resource
import select
import signal
import sys
import time
from dataclasses import dataclass, field

from pyvmm.errors import PyvmmError
from pyvmm.jail import cgroups as cg
from pyvmm.jail import mounts, placement
from pyvmm.jail import syscalls as sc

DEFAULT_BASE = "/srv/jailer"
EXEC_NAME = "pyvmm"                      # <base>/pyvmm/<id>/root, as Firecracker's
ID_PATTERN = re.compile(r"[A-Za-z0-9-]{1,64}")
RLIMITS = {"fsize": resource.RLIMIT_FSIZE, "no-file": resource.RLIMIT_NOFILE}
DEFAULT_NO_FILE = 2048                   # Firecracker's default
KILL_AFTER_TERM = 10.0                   # s: a VMM that ignores SIGTERM (PID 1) is killed
# The jailed interpreter's whole environment: nothing of the caller's leaks in.
# No kernel cache (pyvmm.boot.kernel_cache): it would write decompressed kernels into the
# jail's own root, which holds only what this one VM needs and lives as long as it.
JAIL_ENV = {"LANG": "C.UTF-8", "HOME": "/", "PYVMM_KERNEL_CACHE": "off"}


class JailError(PyvmmError):
    pass


def validate_id(jail_id: str) -> str:
    if not ID_PATTERN.fullmatch(jail_id or ""):
        raise JailError(f"bad --id {jail_id!r}: 1 to 64 letters, digits and '-'")
    return jail_id


SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_resource_limit(text: str) -> tuple[str, int]:
    """'no-file=1024' -> ('no-file', 1024); fsize also takes K, M or G ('fsize=2G')."""
    name, eq, value = text.partition("=")
    match = re.fullmatch(r"(\d+)([KMG]?)", value.upper())
    if name not in RLIMITS or not eq or not match or (name == "no-file" and match.group(2)):
        raise JailError(f"bad --resource-limit {text!r}: use fsize=BYTES (or 512M, 2G) "
                        f"or no-file=N")
    return name, int(match.group(1)) * SIZE_SUFFIXES[match.group(2)]


@dataclass
class JailSpec:
    jail_id: str
    uid: int
    gid: int
    args: list[str]                                   # pyvmm's, after `--`
    base: str = DEFAULT_BASE
    netns: str | None = None
    cgroup_version: int = 1
    cgroups: list[str] = field(default_factory=list)  # "<file>=<value>"
    parent_cgroup: str = cg.DEFAULT_PARENT
    rlimits: dict[str, int] = field(default_factory=dict)
    daemonize: bool = False
    new_pid_ns: bool = False
    binds: list[str] = field(default_factory=list)    # PATH[:rw]

    def __post_init__(self) -> None:
        validate_id(self.jail_id)
        for what, value in (("--uid", self.uid), ("--gid", self.gid)):
            if not 0 <= value < 2**32 - 1:
                raise JailError(f"bad {what} {value}")
        if not self.args:
            raise JailError("give pyvmm's arguments after `--`, e.g. -- run --kernel ...")
        if not os.path.isabs(self.base):
            raise JailError(f"--chroot-base-dir {self.base!r} must be an absolute path")
        self.cgroup_plan = cg.plan(self.cgroups, self.cgroup_version, self.parent_cgroup,
                                   self.jail_id)

    @property
    def jail_dir(self) -> str:
        return os.path.join(self.base, EXEC_NAME, self.jail_id)

    @property
    def root(self) -> str:
        return os.path.join(self.jail_dir, "root")

    @property
    def pid_file(self) -> str:
        """The VMM's host PID, beside (not in) the root the VMM may write to."""
        return os.path.join(self.jail_dir, f"{EXEC_NAME}.pid")


def vmm_args(spec: JailSpec, args: list[str]) -> list[str]:
    """Firecracker passes --id to its VMM: `run` and `api` get the jail's id."""
    if args and args[0] in ("run", "api") and not any(
            a == "--id" or a.startswith("--id=") for a in args[1:]):
        return [args[0], "--id", spec.jail_id, *args[1:]]
    return list(args)


def pycache_prefix() -> str | None:
    """The caller's PYTHONPYCACHEPREFIX, if it is a directory: the jailed interpreter
    reads its bytecode from there (bound read-only), as the caller's pyvmm would."""
    prefix = os.environ.get("PYTHONPYCACHEPREFIX")
    return os.path.realpath(prefix) if prefix and os.path.isdir(prefix) else None


# The third-party modules the jailed VMM may import, outside the standard library that
# -S leaves on sys.path: cffi's backend (the C extension), and the decompressors of the
# bzImage payloads pyvmm.boot.payload unpacks (imported when such a kernel boots).
JAILED_IMPORTS = ("_cffi_backend", "lz4", "zstandard")


def interpreter_argv(args: list[str], cache: str | None = None) -> list[str]:
    """The jailed interpreter's argv: isolated mode (-I: no PYTHON* variables, no user
    site, no script directory on sys.path), no site-packages processing (-S: no .pth
    file runs), no bytecode writes (-B: the binds are read-only); sys.path is the
    standard library, the pyvmm package's parent and the directories of the third-party
    modules pyvmm imports (JAILED_IMPORTS).
    Bytecode comes from __pycache__ beside the sources (compile it once: `python -m
    compileall pyvmm`), or from `cache` (PYTHONPYCACHEPREFIX's), read-only."""
    import pyvmm
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(pyvmm.__file__)))
    extra: list[str] = []
    for name in JAILED_IMPORTS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        where = os.path.dirname(os.path.abspath(module.__file__ or ""))
        if hasattr(module, "__path__"):          # a package: the directory that holds it
            where = os.path.dirname(where)
        if where not in extra:
            extra.append(where)
    boot = ("import sys; " + (f"sys.pycache_prefix = {cache!r}; " if cache else "") +
            f"sys.path[:0] = [{package_parent!r}]; sys.path += {extra!r}; "
            "sys.argv[0] = 'pyvmm'; from pyvmm.cli import main; sys.exit(main())")
    return [os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", boot, *args]


def _default_guest(bzimage: bool) -> tuple[str, str]:
    """The built-in guest, found on the host: the jailed VMM could not build it."""
    from pyvmm import builtin_guest
    found = builtin_guest.find_guest()
    if found is None:
        raise JailError("the built-in guest is not built: run `pyvmm guest build` first, or "
                        "give --kernel and --initrd")
    return str(found.bzimage if bzimage else found.vmlinux), str(found.initramfs)


def prepare(spec: JailSpec) -> tuple[list[str], mounts.MountPlan]:
    """Everything decided before any process changes: the jail directories, the VMM's
    argv and the mount plan."""
    os.makedirs(os.path.join(spec.base, EXEC_NAME), mode=0o755, exist_ok=True)
    os.makedirs(spec.jail_dir, mode=0o755, exist_ok=True)
    if os.path.islink(spec.root):
        raise JailError(f"{spec.root} is a symlink")
    os.makedirs(spec.root, mode=0o755, exist_ok=True)
    args = spec.args
    _check_fsize(spec)
    bzimage = "--bzimage" in args
    placed = placement.place(vmm_args(spec, args), spec.root,
                             default_guest=lambda: _default_guest(bzimage))
    files = list(placed.files)
    for text in spec.binds:
        path, _, mode = text.partition(":")
        if mode not in ("", "ro", "rw"):
            raise JailError(f"bad --bind {text!r}: PATH, PATH:ro or PATH:rw")
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise JailError(f"--bind {path}: no such file or directory")
        files.append((path, mode == "rw"))
    for path, writable in files:
        placement.check_access(path, spec.uid, spec.gid, writable)
    plan = mounts.MountPlan(devices=mounts.devices())
    # The ldd cache sits beside the jails, in a directory only root writes.
    mounts.interpreter_plan(plan, cache_dir=os.path.join(spec.base, EXEC_NAME))
    for path, writable in files:
        plan.add(path, read_only=not writable)
    cache = pycache_prefix()
    if cache is not None:
        plan.add(cache)
    return interpreter_argv(placed.args, cache), plan


def _check_fsize(spec: JailSpec) -> None:
    """Guest RAM is a memfd, whose size RLIMIT_FSIZE caps: a smaller fsize than the
    VM's memory fails its creation with a bare 'File too large'.  Say it here."""
    fsize = spec.rlimits.get("fsize")
    if fsize is None or not spec.args or spec.args[0] != "run":
        return
    mem_mib = 256
    for i, arg in enumerate(spec.args):
        value = arg[6:] if arg.startswith("--mem=") else (
            spec.args[i + 1] if arg == "--mem" and i + 1 < len(spec.args) else None)
        if value is not None:
            from pyvmm.cli import parse_mem
            try:
                mem_mib = parse_mem(value)
            except Exception:  # noqa: BLE001 - pyvmm itself will reject it
                return
    if fsize < mem_mib << 20:
        raise JailError(f"--resource-limit fsize={fsize} is below the VM's memory "
                        f"({mem_mib} MiB): guest RAM is a memfd, which RLIMIT_FSIZE caps too")


# -- the VMM's process, between fork and exec ------------------------------------------------

def _enter_jail(spec: JailSpec, argv: list[str], plan: mounts.MountPlan,
                groups: cg.Cgroups, netns_fd: int | None, keep_fd: int) -> None:
    groups.enter()
    no_file = spec.rlimits.get("no-file", DEFAULT_NO_FILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (no_file, no_file))
    if "fsize" in spec.rlimits:
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec.rlimits["fsize"],) * 2)
    if netns_fd is not None:
        sc.setns(netns_fd, sc.CLONE_NEWNET)
        os.close(netns_fd)
    sc.unshare(sc.CLONE_NEWNS)
    mounts.carry_out(plan, spec.root, spec.uid, spec.gid)
    os.closerange(3, keep_fd)                # close_range(2) under the hood
    os.closerange(keep_fd + 1, 1 << 20)
    os.setgroups([])
    os.setresgid(spec.gid, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)
    sc.set_no_new_privs()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execve(argv[0], argv, dict(JAIL_ENV))


# -- the supervisor --------------------------------------------------------------------------

def _daemonize() -> int | None:
    """Firecracker's double fork.  In the caller: wait for the daemon's word and return
    the exit status.  In the daemon: None (stdio on /dev/null, report() tells the caller)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        message = b""
        while chunk := os.read(r, 4096):
            message += chunk
        os.close(r)
        os.waitpid(pid, 0)
        text = message.decode(errors="replace")
        if text.startswith("ok"):
            return 0
        print(f"pyvmm jail: error: {text or 'the daemon died'}", file=sys.stderr)
        return 2
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    _Report.fd = w
    return None


class _Report:
    """The daemon's line back to the waiting caller (no-op without --daemonize)."""
    fd: int | None = None

    @classmethod
    def send(cls, text: str) -> None:
        if cls.fd is not None:
            os.write(cls.fd, text.encode())
            os.close(cls.fd)
            cls.fd = None


def run(spec: JailSpec) -> int:
    """Jail and run the VMM; its exit status (128+N if killed by signal N)."""
    started = time.monotonic()
    argv, plan = prepare(spec)
    netns_fd = None
    if spec.netns is not None:
        try:
            netns_fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise JailError(f"--netns {spec.netns}: {exc.strerror}") from None
    if spec.daemonize:
        status = _daemonize()
        if status is not None:
            return status
    groups = cg.Cgroups(spec.cgroup_plan)
    try:
        try:
            groups.create()
        except OSError as exc:
            raise JailError(f"cannot create the jail's cgroups: {exc.strerror}: "
                            f"{exc.filename}") from None
        if spec.new_pid_ns:
            sc.unshare(sc.CLONE_NEWPID)      # our next child is PID 1 of a new namespace
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(status_r)
                _enter_jail(spec, argv, plan, groups, netns_fd, status_w)
            except BaseException as exc:  # noqa: BLE001 - reported to the supervisor
                text = str(exc) if isinstance(exc, (OSError, PyvmmError)) else repr(exc)
                try:
                    os.write(status_w, text.encode())
                finally:
                    os._exit(2)
        os.close(status_w)
        if netns_fd is not None:
            os.close(netns_fd)
        failure = b""
        while chunk := os.read(status_r, 4096):     # EOF at the exec
            failure += chunk
        os.close(status_r)
        if failure:
            os.waitpid(pid, 0)
            raise JailError(f"setting up the jail failed: {failure.decode(errors='replace')}")
        _write_pid(spec.pid_file, pid)
        _Report.send(f"ok {pid}")
        if os.environ.get("PYVMM_JAIL_TIMING"):
            print(f"pyvmm jail: exec after {1000 * (time.monotonic() - started):.1f} ms",
                  file=sys.stderr)
        try:
            return _supervise(pid, groups)
        finally:
            try:
                os.unlink(spec.pid_file)
            except OSError:
                pass
    except Exception as exc:
        _Report.send(str(exc))
        raise
    finally:
        problems = groups.remove()
        for problem in problems:
            print(f"pyvmm jail: warning: cgroup not removed: {problem}", file=sys.stderr)


def _write_pid(path: str, pid: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def _supervise(pid: int, groups: cg.Cgroups) -> int:
    """Wait for the VMM; forward SIGTERM and SIGHUP (and SIGINT/SIGQUIT when they do not
    come from a terminal, which sends them to the VMM itself); kill it if it is still
    there KILL_AFTER_TERM s after a SIGTERM (a PID 1 without a handler ignores it)."""
    term_at: list[float] = []

    def forward(signum, frame):  # noqa: ANN001 - a signal handler
        if signum == signal.SIGTERM and not term_at:
            term_at.append(time.monotonic())
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    forwarded = [signal.SIGTERM, signal.SIGHUP]
    tty = os.isatty(0)
    for signum in (signal.SIGINT, signal.SIGQUIT):
        if tty:
            signal.signal(signum, signal.SIG_IGN)
        else:
            forwarded.append(signum)
    for signum in forwarded:
        signal.signal(signum, forward)
    pidfd = os.pidfd_open(pid)
    # A signal must end the select() below: Python retries an interrupted select with
    # the timeout it was given (None before the first SIGTERM), so without this wake-up
    # pipe the SIGKILL deadline a SIGTERM sets would never be looked at.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        while True:
            timeout = None
            if term_at:
                timeout = max(0.0, term_at[0] + KILL_AFTER_TERM - time.monotonic())
            ready, _, _ = select.select([pidfd, wake_r], [], [], timeout)
            if pidfd in ready:
                break
            if wake_r in ready:
                os.read(wake_r, 512)
            if term_at and time.monotonic() >= term_at[0] + KILL_AFTER_TERM:
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        os.close(pidfd)
        for signum in forwarded:
            signal.signal(signum, signal.SIG_DFL)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    signum = os.WTERMSIG(status)
    name = signal.Signals(signum).name
    oom = groups.oom_kills()
    if oom:
        limit = ", ".join(f"{w.file}={w.value}" for w in groups.plan.writes
                          if w.controller == "memory") or "its memory limit"
        print(f"pyvmm jail: error: the VMM ran out of memory in its cgroup ({limit}) and "
              f"the kernel's OOM killer ended it ({name}): raise the limit above what the "
              "VM needs", file=sys.stderr)
    else:
        print(f"pyvmm jail: error: the VMM was killed by {name}", file=sys.stderr)
    return 128 + signum

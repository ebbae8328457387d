"""The VM's own files in the jail: found in the pyvmm arguments after `--`.

Firecracker's jailer leaves it to the user to hard-link or copy the kernel, the disks...
into the jail root.  pyvmm's jailer binds them instead, each at its own host path (the
mount plan mirrors host paths): no copy of a large disk, no hard link (which would only
work on the same file system, and whose owner change would be the host file's too), and
nothing left to clean up, since binds die with the jail's mount namespace.  Input paths
of `run` (--kernel, --initrd, --disk, --config-file and the files it names, --restore,
--snapshot, --snapshot-mem, --disk-override, --uffd) are host paths, relative ones to the jailer's
working directory; a path that exists under the jail root already (placed there the
Firecracker way) is left alone.  Outputs (--api-sock, console files, vsock sockets,
snapshots made through the API) are written inside the jail: a relative path lands under
`<base>/pyvmm/<id>/root/`.  `--bind PATH` adds any other host file or directory.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field

from pyvmm.errors import PyvmmError

# run's flags that name input files: flag -> how its value names them.
PATH_FLAGS = {"--kernel": "path", "--initrd": "path", "--disk": "disk",
              "--config-file": "config", "--restore": "dir", "--snapshot": "path",
              "--snapshot-mem": "path", "--disk-override": "override", "--uffd": "path"}
SNAPSHOT_FILES = ("vm.state", "vm.mem")


class PlacementError(PyvmmError):
    pass


@dataclass
class Placement:
    args: list[str]                                     # the pyvmm arguments to exec
    files: list[tuple[str, bool]] = field(default_factory=list)   # (host path, writable)

    def need(self, path: str, writable: bool) -> None:
        if (path, writable) not in self.files:
            self.files.append((path, writable))


def _absolute(path: str, cwd: str) -> str:
    return os.path.normpath(os.path.join(cwd, path))


def place(args: list[str], root: str, cwd: str | None = None, default_guest=None) -> Placement:
    """Rewrite relative input paths in `args` to absolute ones and list the host files
    the jail must show.  default_guest() -> (kernel, initrd) when `run` names no kernel."""
    cwd = cwd or os.getcwd()
    out = Placement(list(args))
    if not args or args[0] != "run":
        return out
    i = 1
    has_kernel = False
    while i < len(out.args):
        arg = out.args[i]
        flag, eq, inline = arg.partition("=")
        if flag not in PATH_FLAGS:
            i += 1
            continue
        if eq:
            value, index = inline, i
        else:
            if i + 1 >= len(out.args):
                raise PlacementError(f"{flag} needs a value")
            value, index = out.args[i + 1], i + 1
        kind = PATH_FLAGS[flag]
        if flag in ("--kernel", "--config-file", "--restore", "--snapshot"):
            has_kernel = True
        new = _place_value(kind, value, root, cwd, out)
        out.args[index] = f"{flag}={new}" if eq else new
        i = index + 1
    if not has_kernel and default_guest is not None:
        kernel, initrd = default_guest()
        out.args[1:1] = ["--kernel", kernel, "--initrd", initrd]
        out.need(kernel, False)
        out.need(initrd, False)
    return out


def _inside(root: str, path: str) -> bool:
    """path (absolute, as the VMM will see it) exists under the jail root already."""
    return os.path.lexists(os.path.join(root, path.lstrip("/")))


def _input(path: str, root: str, cwd: str, out: Placement, writable: bool) -> str:
    if path.startswith("/") and _inside(root, path) and not os.path.exists(path):
        return path                                  # placed in the jail by the user
    host = _absolute(path, cwd)
    if not os.path.exists(host):
        if _inside(root, "/" + path):
            return "/" + path.lstrip("/")
        raise PlacementError(f"{path}: no such file on the host (nor under the jail root "
                             f"{root})")
    out.need(host, writable)
    return host


def _place_value(kind: str, value: str, root: str, cwd: str, out: Placement) -> str:
    if kind == "path":
        return _input(value, root, cwd, out, False)
    if kind == "dir":
        return _input(value, root, cwd, out, False)
    if kind == "disk":                      # PATH[,ro][,root][,id=NAME]
        path, *options = value.split(",")
        writable = "ro" not in options
        return ",".join([_input(path, root, cwd, out, writable), *options])
    if kind == "override":                  # ID=PATH
        key, eq, path = value.partition("=")
        if not eq:
            return value
        return f"{key}={_input(path, root, cwd, out, True)}"
    if kind == "config":
        host = _input(value, root, cwd, out, False)
        if os.path.exists(host):
            _config_inputs(host, root, cwd, out)
        return host
    raise AssertionError(kind)


def _config_inputs(path: str, root: str, cwd: str, out: Placement) -> None:
    """The files a Firecracker config file names must be visible at those paths: the
    file is not rewritten, so its relative paths must already be valid in the jail."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return                               # pyvmm itself will say what is wrong
    boot = config.get("boot-source") or {}
    wanted = [(boot.get("kernel_image_path"), False), (boot.get("initrd_path"), False)]
    for drive in config.get("drives") or []:
        wanted.append((drive.get("path_on_host"), not drive.get("is_read_only", False)))
    for name, writable in wanted:
        if isinstance(name, str) and name.startswith("/") and os.path.exists(name) \
                and not _inside(root, name):
            out.need(name, writable)


def check_access(path: str, uid: int, gid: int, writable: bool) -> None:
    """The jailed uid:gid must be able to read (and write) the file by its mode bits:
    say so now rather than as a failure inside the jail."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        need_r, need_w = 0o5, 0o2 if writable else 0
    else:
        need_r, need_w = 0o4, 0o2 if writable else 0
    need = need_r | need_w
    if uid == 0:
        return
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid == gid:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    if bits & need != need:
        what = "read and written" if writable else "read"
        raise PlacementError(f"{path} cannot be {what} by uid {uid} gid {gid} (owner "
                             f"{st.st_uid}:{st.st_gid}, mode {stat.filemode(st.st_mode)}): "
                             f"chown or chmod it for the jail")

"""`pyvmm jail ... -- <pyvmm arguments>`: run pyvmm confined, as Firecracker's jailer
runs Firecracker (pyvmm.jail; docs/jail.md)."""
from __future__ import annotations

import argparse
from typing import Any

from pyvmm.errors import PyvmmError

USAGE_TAIL = "-- <pyvmm arguments, e.g. run --kernel K --initrd I, or api --api-sock S>"


def add_parser(sub: Any, parser_class: type) -> argparse.ArgumentParser:
    from pyvmm.jail.cgroups import DEFAULT_PARENT
    from pyvmm.jail.jailer import DEFAULT_BASE
    jail = sub.add_parser(
        "jail", help="run pyvmm in a jail: its own root, namespaces, cgroups, an "
                     "unprivileged uid (Firecracker's jailer)",
        usage=f"pyvmm jail --id ID --uid UID --gid GID [options] {USAGE_TAIL}")
    jail.add_argument("--id", required=True, dest="jail_id",
                      help="the jail's id: 1 to 64 letters, digits and '-'; the root is "
                           "<chroot-base-dir>/pyvmm/<id>/root and run/api get --id ID")
    jail.add_argument("--uid", type=int, required=True, help="the VMM's user id")
    jail.add_argument("--gid", type=int, required=True, help="the VMM's group id")
    jail.add_argument("--chroot-base-dir", default=DEFAULT_BASE, metavar="DIR",
                      help=f"where jails are made (default {DEFAULT_BASE})")
    jail.add_argument("--netns", default=None, metavar="PATH",
                      help="join this network namespace (e.g. /var/run/netns/NAME)")
    jail.add_argument("--cgroup-version", type=int, choices=(1, 2), default=1,
                      help="the cgroup hierarchy to use (default 1, as Firecracker)")
    jail.add_argument("--cgroup", action="append", default=[], metavar="FILE=VALUE",
                      help="a cgroup file to set, e.g. memory.max=512M, pids.max=64, "
                           "cpu.max='50000 100000', io.max='8:0 wbps=1048576' (v2 names "
                           "work on v1 too); repeatable")
    jail.add_argument("--parent-cgroup", default=DEFAULT_PARENT, metavar="PATH",
                      help=f"the jail's cgroup is <hierarchy>/PATH/<id> (default "
                           f"{DEFAULT_PARENT})")
    jail.add_argument("--resource-limit", action="append", default=[],
                      metavar="fsize=N|no-file=N",
                      help="an rlimit (no-file defaults to 2048); repeatable")
    jail.add_argument("--daemonize", action="store_true",
                      help="detach (setsid, stdio on /dev/null); exit once the VMM runs")
    jail.add_argument("--new-pid-ns", action="store_true",
                      help="the VMM is PID 1 of a new PID namespace")
    jail.add_argument("--bind", action="append", default=[], metavar="PATH[:rw]",
                      help="also show this host file or directory in the jail, at the same "
                           "path, read-only unless :rw (for files given through the API)")
    return jail


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """`jail <jail flags> -- <pyvmm args>` -> the two lists."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def cmd_jail(args: argparse.Namespace, pyvmm_args: list[str]) -> int:
    from pyvmm.jail.jailer import JailSpec, parse_resource_limit, run
    if not pyvmm_args:
        raise PyvmmError(f"pyvmm jail needs the VMM's arguments: {USAGE_TAIL}")
    spec = JailSpec(jail_id=args.jail_id, uid=args.uid, gid=args.gid, args=pyvmm_args,
                    base=args.chroot_base_dir, netns=args.netns,
                    cgroup_version=args.cgroup_version, cgroups=args.cgroup,
                    parent_cgroup=args.parent_cgroup,
                    rlimits=dict(parse_resource_limit(t) for t in args.resource_limit),
                    daemonize=args.daemonize, new_pid_ns=args.new_pid_ns, binds=args.bind)
    return run(spec)


def main(argv: list[str]) -> int:
    """`pyvmm jail ...` (argv without the leading 'jail')."""
    from pyvmm.cli import _build_parser, user_error_exit
    flags, pyvmm_args = split_argv(argv)
    args = _build_parser().parse_args(["jail", *flags])
    return user_error_exit("pyvmm jail", lambda: cmd_jail(args, pyvmm_args))

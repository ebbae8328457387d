"""`pyvmm` command line: run a VM, build or locate the default guest; exec, cp and
sandbox (pyvmm.cli_sandbox) reach a guest's agent.

Errors are one line on stderr and a non-zero status, never a traceback.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
from typing import Any
from collections.abc import Callable
from pathlib import Path

from pyvmm.errors import PyvmmError

EXIT_ERROR = 2
MEM_UNITS = {"": 1, "M": 1, "MIB": 1, "G": 1024, "GIB": 1024}


def parse_mem(text: str) -> int:
    """'256', '256M', '1G' -> MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in MEM_UNITS:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r}: use e.g. 256, 256M or 1G")
    return int(match.group(1)) * MEM_UNITS[match.group(2).upper()]


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'4096', '512K', '64M', '1G' -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(I?B)?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 4096, 512K, 64M or 1G")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other pyvmm error (`-h` shows usage)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def _add_process_flags(parser: argparse.ArgumentParser, api_required: bool = False) -> None:
    parser.add_argument("--api-sock", type=Path, required=api_required,
                        help="serve Firecracker's REST API on this Unix socket")
    parser.add_argument("--id", default=None, dest="vm_id",
                        help="the instance id (GET /); default anonymous-instance")
    parser.add_argument("--console", default="stdio",
                        help="where the guest's serial output goes: stdio, file:PATH or none")
    parser.add_argument("--console-limit", type=parse_size, default=None, metavar="SIZE",
                        help="a console file stops growing at SIZE (e.g. 64M, the default); "
                             "later output is dropped and counted")
    seccomp = parser.add_mutually_exclusive_group()
    seccomp.add_argument("--no-seccomp", action="store_true",
                         help="run every thread without its seccomp filter (docs/seccomp.md)")
    seccomp.add_argument("--seccomp-filter", type=Path, default=None, metavar="FILE",
                         help="the seccomp filters from FILE (pyvmm/seccomp/default.json's "
                              "format) instead of pyvmm's")


# The two files of a snapshot directory (`--restore DIR`, `pyvmm snapshot create DIR`).
SNAPSHOT_STATE, SNAPSHOT_MEM = "vm.state", "vm.mem"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyvmm", description="A microVM monitor on /dev/kvm.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="boot a Linux guest with its console on this terminal")
    vm_flags = run.add_argument_group("the VM (or --config-file)")
    vm_flags.add_argument("--kernel", type=Path,
                          help="bzImage or PVH vmlinux (default: the built-in guest)")
    vm_flags.add_argument("--initrd", type=Path, help="initramfs (default: the built-in guest's)")
    vm_flags.add_argument("--cmdline", default=None,
                          help="appended to the default kernel command line")
    vm_flags.add_argument("--mem", type=parse_mem, default=None,
                          help="guest RAM in MiB, or with M/G (default 256)")
    vm_flags.add_argument("--cpus", type=int, default=None, help="number of vCPUs (default 1)")
    vm_flags.add_argument("--disk", action="append", default=[],
                          metavar="PATH[,ro][,root][,id=NAME][,io_engine=async]",
                          help="a virtio-blk disk (repeatable); `root` makes it the root "
                               "device (/dev/vda, root= on the command line); "
                               "io_engine=async does its I/O through io_uring")
    vm_flags.add_argument("--net", action="append", default=[], metavar="tap=NAME[,mac=MAC][,id=NAME]",
                          help="a virtio-net interface on a TAP device (repeatable)")
    vm_flags.add_argument("--rng", action="store_true", help="a virtio-rng entropy device")
    vm_flags.add_argument("--vsock", default=None, metavar="cid=N,uds=PATH[,id=NAME]",
                          help="a virtio-vsock device; host programs reach the guest through "
                               "the Unix socket PATH (Firecracker's CONNECT protocol), and "
                               "the guest's agent through `pyvmm exec --vsock PATH`")
    vm_flags.add_argument("--bzimage", action="store_true",
                          help="with the built-in guest, boot its bzImage instead of the PVH "
                               "vmlinux")
    vm_flags.add_argument("--no-host-decompress", dest="host_decompress",
                          action="store_false",
                          help="let a bzImage decompress its kernel in the guest (as QEMU and "
                               "Firecracker do) instead of pyvmm decompressing and caching "
                               "it on the host")
    restore = run.add_argument_group("or resume a snapshot instead of booting")
    restore.add_argument("--restore", type=Path, metavar="DIR",
                         help=f"the snapshot in DIR ({SNAPSHOT_STATE} and {SNAPSHOT_MEM}, as "
                              "`pyvmm snapshot create` writes them)")
    restore.add_argument("--snapshot", type=Path, metavar="FILE", help="the state file")
    restore.add_argument("--snapshot-mem", type=Path, metavar="FILE", help="the memory file")
    restore.add_argument("--uffd", type=Path, metavar="SOCKET",
                         help="serve guest memory through the page-fault handler listening "
                              "on SOCKET (Firecracker's Uffd backend) instead of the file")
    restore.add_argument("--net-override", action="append", default=[], metavar="ID=TAP",
                         help="restore network interface ID on TAP (repeatable)")
    restore.add_argument("--disk-override", action="append", default=[], metavar="ID=PATH",
                         help="restore drive ID on the image PATH, a copy of the snapshot's "
                              "(repeatable)")
    restore.add_argument("--vsock-override", default=None, metavar="UDS_PATH",
                         help="the restored vsock device listens on UDS_PATH instead of the "
                              "snapshot's")
    restore.add_argument("--paused", action="store_true",
                         help="stay paused after loading (resume through the API)")
    restore.add_argument("--clock-realtime", action="store_true",
                         help="advance the guest's clock by the time since the snapshot")
    restore.add_argument("--track-dirty-pages", action="store_true",
                         help="track dirty pages, for Diff snapshots of the restored VM")
    run.add_argument("--mmds", "--metadata", type=Path, default=None, metavar="FILE",
                     help="serve this JSON object to the guest as its metadata, over HTTP at "
                          "169.254.169.254 inside virtio-net (Firecracker's MMDS; V2 on every "
                          "--net interface unless the config file has an mmds-config)")
    run.add_argument("--mmds-version", choices=("V1", "V2"), default=None,
                     help="with --mmds and --net: V2 (session tokens, the default) or V1")
    run.add_argument("--config-file", type=Path,
                     help="a Firecracker config file (the JSON of GET /vm/config) instead of "
                          "the VM flags")
    _add_process_flags(run)
    run.add_argument("--no-api", action="store_true",
                     help="serve no API (the default without --api-sock; as in Firecracker)")
    run.add_argument("--stats", action="store_true", help="print exit counters at exit")
    run.add_argument("--profile-guest", type=Path, default=None, metavar="FILE",
                     help="sample every vCPU's RIP and ring into FILE while the guest runs; "
                          "`pyvmm profile FILE` reads it (docs/profiler.md)")
    run.add_argument("--profile-hz", type=int, default=None, metavar="N",
                     help="samples per second and vCPU with --profile-guest (default 250)")
    from pyvmm import cli_trace
    cli_trace.add_run_flags(run)
    run.add_argument("--gdb", default=None, metavar="PATH|HOST:PORT",
                     help="serve gdb's remote protocol on a Unix socket or TCP port: "
                          "`gdb vmlinux -ex 'target remote PATH'` (README: Debugging the "
                          "guest kernel)")
    run.add_argument("--gdb-wait", action="store_true",
                     help="with --gdb, hold every vCPU before its first instruction until "
                          "gdb attaches (QEMU's -S)")

    api = sub.add_parser("api", help="serve Firecracker's API; the VM is configured and "
                                     "started through it")
    _add_process_flags(api, api_required=True)
    api.add_argument("--stats", action="store_true", help="print exit counters at exit")

    snap = sub.add_parser("snapshot", help="take, inspect and merge snapshots")
    snap_sub = snap.add_subparsers(dest="snapshot_command", required=True, parser_class=_Parser)
    create = snap_sub.add_parser("create", help="snapshot a running pyvmm through its API "
                                                "socket: pause, save, resume")
    create.add_argument("--api-sock", type=Path, required=True, help="the VM's API socket")
    create.add_argument("dir", type=Path, metavar="DIR",
                        help=f"where to write {SNAPSHOT_STATE} and {SNAPSHOT_MEM}")
    create.add_argument("--diff", action="store_true",
                        help="a Diff snapshot: only the pages dirtied since the last one")
    create.add_argument("--keep-paused", action="store_true",
                        help="leave the VM paused afterwards")
    info = snap_sub.add_parser("info", help="what a snapshot state file holds")
    info.add_argument("file", type=Path, metavar="FILE",
                      help=f"a state file, or a snapshot directory")
    merge = snap_sub.add_parser("merge", help="apply a Diff snapshot's memory onto its base "
                                              "memory file (in place)")
    merge.add_argument("base_mem", type=Path, metavar="BASE_MEM")
    merge.add_argument("diff_state", type=Path, metavar="DIFF_STATE")
    merge.add_argument("diff_mem", type=Path, metavar="DIFF_MEM")

    guest = sub.add_parser("guest", help="the built-in guest: kernel, initramfs, agent, and "
                                            "the sandbox root file system")
    guest_sub = guest.add_subparsers(dest="guest_command", required=True, parser_class=_Parser)
    build = guest_sub.add_parser("build", help="build it unless cached (minutes)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    guest_sub.add_parser("path", help="print name=path for bzimage, vmlinux, initramfs, "
                                      "system_map, ..., vmlinux_debug (symbols, for gdb)")

    from pyvmm import cli_sandbox
    cli_sandbox.add_parsers(sub, _Parser, parse_mem)
    from pyvmm import cli_jail
    cli_jail.add_parser(sub, _Parser)
    from pyvmm import cli_profile
    cli_profile.add_parser(sub, _Parser)
    cli_trace.add_parser(sub, _Parser)
    from pyvmm import cli_stat
    cli_stat.add_parser(sub, _Parser)
    return parser


def _default_guest(build: bool):
    from pyvmm import builtin_guest
    # `pyvmm run` needs no sandbox root file system: never download Debian for it.
    return builtin_guest.ensure_guest(progress=True, rootfs=False) if build \
        else builtin_guest.find_guest()


# -- the syntax of --disk and --net (the model itself is pyvmm.config) --------------------

def parse_disk(text: str, index: int):
    """`PATH[,ro][,root][,id=NAME][,io_engine=sync|async]` (the `--disk` flag) as a
    pyvmm.config.Drive."""
    from pyvmm.config import Drive
    path, *options = text.split(",")
    drive_id, read_only, root = f"drive{index}", False, False
    engine = {}
    for option in options:
        if option == "ro":
            read_only = True
        elif option == "root":
            root = True
        elif option.startswith("id="):
            drive_id = option[3:]
        elif option.startswith("io_engine="):
            engine["io_engine"] = option[10:].capitalize()    # Firecracker's Sync/Async
        else:
            raise PyvmmError(f"--disk {text}: unknown option {option!r}: use "
                             "PATH[,ro][,root][,id=NAME][,io_engine=sync|async]")
    return Drive.from_json({"drive_id": drive_id, "path_on_host": path,
                            "is_root_device": root, "is_read_only": read_only, **engine},
                           f"--disk {text}")


def parse_net(text: str, index: int):
    """`tap=NAME[,mac=XX:..][,id=NAME]` (the `--net` flag) as a
    pyvmm.config.NetworkInterface."""
    from pyvmm.config import NetworkInterface
    values = {"id": f"eth{index}"}
    for option in text.split(","):
        key, eq, value = option.partition("=")
        if not eq or key not in ("tap", "mac", "id"):
            raise PyvmmError(f"--net {text}: bad option {option!r}: use "
                             "tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,id=NAME]")
        values[key] = value
    if "tap" not in values:
        raise PyvmmError(f"--net {text}: tap=NAME is required")
    body = {"iface_id": values["id"], "host_dev_name": values["tap"]}
    if "mac" in values:
        body["guest_mac"] = values["mac"]
    return NetworkInterface.from_json(body, f"--net {text}")


VM_FLAGS = ("kernel", "initrd", "cmdline", "mem", "cpus", "disk", "net", "rng", "vsock",
            "bzimage")


def spec_from_args(args: argparse.Namespace):
    """`pyvmm run`'s flags (or its --config-file) as the one configuration model."""
    from pyvmm.config import VmSpec
    if args.config_file is not None:
        given = [f"--{name}" for name in VM_FLAGS if getattr(args, name) not in (None, False, [])]
        if given:
            raise PyvmmError(f"{', '.join(given)} cannot be combined with --config-file: the "
                             "config file describes the whole VM")
        spec = VmSpec.from_file(args.config_file)
        if not args.host_decompress and spec.boot_source is not None:
            spec.boot_source.host_decompress = False
        return spec
    vsock = None
    if args.vsock is not None:                 # a bad flag is an error before any build
        from pyvmm.config import Vsock
        vsock = Vsock.from_cli(args.vsock)
    kernel, initrd = args.kernel, args.initrd
    if kernel is None:
        guest = _default_guest(build=True)
        kernel = guest.bzimage if args.bzimage else guest.vmlinux
        initrd = initrd or guest.initramfs
    spec = VmSpec.build(kernel=kernel, initrd=initrd, cmdline=args.cmdline or "",
                        vcpus=1 if args.cpus is None else args.cpus,
                        mem_mib=256 if args.mem is None else args.mem,
                        drives=[parse_disk(text, i) for i, text in enumerate(args.disk)],
                        nets=[parse_net(text, i) for i, text in enumerate(args.net)],
                        rng=args.rng, host_decompress=args.host_decompress)
    spec.vsock = vsock
    return spec


def _serve_vm(vm, args: argparse.Namespace, start: bool) -> int:
    """Run vm (now, or when the API's InstanceStart comes) until it ends."""
    import signal
    import threading
    from pyvmm.console import StdinReader

    server = None
    if args.api_sock is not None:
        from pyvmm.api.server import ApiServer
        server = ApiServer(vm, http=args.http)
        server.start()
    previous = signal.signal(signal.SIGTERM, _terminate) \
        if threading.current_thread() is threading.main_thread() else None
    reader = None
    try:
        if start:
            vm.start()
        while not vm.started.wait(0.5):
            pass
        if vm.pvm:
            from pyvmm.pvm import STARTUP_NOTICE
            print(STARTUP_NOTICE, file=sys.stderr)
        for notice in vm.notices:
            print(notice, file=sys.stderr)
        if args.console == "stdio" and vm.state != "Exited":
            reader = StdinReader(functools.partial(_type_into, vm), vm.stop)
            reader.seccomp = args.seccomp
            reader.start()
        # Last: every VMM thread exists now (those started later by the API thread get
        # its filter), and this thread only waits for the end and tears down.
        from pyvmm import seccomp
        seccomp.enter_thread("main", args.seccomp)
        result = None
        while result is None:
            result = vm.wait(0.5)
    finally:
        if reader is not None:
            reader.stop()
        if server is not None:
            server.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.stats:
        import json
        print(json.dumps(vm.stats, indent=1), file=sys.stderr)
    from pyvmm import cli_trace
    cli_trace.report_recording(vm)
    if result.exit_code:
        print(f"pyvmm: {result.reason}", file=sys.stderr)
    return result.exit_code


def _type_into(vm, data: bytes) -> None:
    from pyvmm.microvm import MicroVMError
    try:
        vm.serial.write(data)
    except MicroVMError:
        pass                        # typed after the VM ended: nobody to read it


def _terminate(signum, frame):  # noqa: ANN001 - a signal handler
    # Once: a second SIGTERM (a supervisor forwarding one it got twice) raised in the
    # middle of the teardown the first one started would leave the VMM half torn down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _microvm(spec, args: argparse.Namespace):
    from pyvmm.config import SerialConfig
    from pyvmm.microvm import DEFAULT_ID, MicroVM
    if args.console_limit is not None:
        path = spec.serial.serial_out_path if spec.serial else None
        spec.serial = SerialConfig(path, args.console_limit)
    profile_guest = getattr(args, "profile_guest", None)       # `pyvmm run` only
    if getattr(args, "profile_hz", None) is not None and profile_guest is None:
        raise PyvmmError("--profile-hz needs --profile-guest FILE")
    from pyvmm import cli_trace
    return MicroVM(spec=spec, console=args.console, vm_id=args.vm_id or DEFAULT_ID,
                   seccomp=args.seccomp, profile_guest=profile_guest,
                   profile_hz=getattr(args, "profile_hz", None),
                   **cli_trace.trace_options(args))


def _bind_api_socket(args: argparse.Namespace) -> None:
    """Listen on --api-sock first thing: connections queue in the backlog while the
    rest of pyvmm is imported, and are answered as soon as the server starts."""
    from pyvmm import seccomp
    # Checked first, so a bad filter file is one line before anything starts.
    args.seccomp = None if args.no_seccomp else seccomp.resolve(args.seccomp_filter or True)
    args.http = None
    if args.api_sock is not None:
        from pyvmm.api.http import HttpServer
        args.http = HttpServer(str(args.api_sock))
        args.http.seccomp = args.seccomp
        args.http.bind()


def load_request_from_args(args: argparse.Namespace):
    """`pyvmm run --restore/--snapshot...` as a pyvmm.snapshot.LoadRequest, or None."""
    from pyvmm.snapshot import FILE, UFFD, LoadRequest
    wants = args.restore is not None or args.snapshot is not None
    restore_only = {"snapshot_mem": "--snapshot-mem", "uffd": "--uffd",
                    "net_override": "--net-override", "disk_override": "--disk-override",
                    "vsock_override": "--vsock-override", "paused": "--paused",
                    "clock_realtime": "--clock-realtime",
                    "track_dirty_pages": "--track-dirty-pages"}
    if not wants:
        given = [flag for name, flag in restore_only.items() if getattr(args, name)]
        if given:
            raise PyvmmError(f"{given[0]} needs --restore DIR or --snapshot FILE")
        return None
    given = [f"--{name.replace('_', '-')}" for name in VM_FLAGS + ("config_file",)
             if getattr(args, name) not in (None, False, [])]
    if given:
        raise PyvmmError(f"{given[0]} cannot be combined with restoring a snapshot: the "
                         "snapshot holds the whole VM")
    if args.restore is not None and args.snapshot is not None:
        raise PyvmmError("give --restore DIR or --snapshot FILE, not both")
    if args.restore is not None:
        state, mem = args.restore / SNAPSHOT_STATE, args.restore / SNAPSHOT_MEM
    else:
        state, mem = args.snapshot, args.snapshot_mem
    if args.uffd is not None:
        backend_type, backend_path = UFFD, args.uffd
    elif mem is None:
        raise PyvmmError("--snapshot needs --snapshot-mem FILE (or --uffd SOCKET)")
    else:
        backend_type, backend_path = FILE, mem
    def pairs(flag: str, texts: list[str], what: str) -> dict[str, str]:
        out = {}
        for text in texts:
            key, sep, value = text.partition("=")
            if not sep or not key or not value:
                raise PyvmmError(f"bad {flag} {text!r}: use ID={what}")
            out[key] = value
        return out
    return LoadRequest(str(state), str(backend_path), backend_type, args.track_dirty_pages,
                       not args.paused, pairs("--net-override", args.net_override, "TAP"),
                       args.clock_realtime,
                       pairs("--disk-override", args.disk_override, "PATH"),
                       vsock_override=args.vsock_override)


def _apply_gdb(spec, args: argparse.Namespace) -> None:
    """--gdb and --gdb-wait into machine-config (gdb_socket_path, gdb_wait)."""
    if args.gdb_wait and args.gdb is None:
        raise PyvmmError("--gdb-wait needs --gdb PATH|HOST:PORT")
    if args.gdb is not None:
        from pyvmm.gdb.server import parse_address
        parse_address(args.gdb)             # a bad address is one line before the boot
        spec.machine_config.gdb_socket_path = args.gdb
        spec.machine_config.gdb_wait = args.gdb_wait


def _read_mmds(args: argparse.Namespace) -> Any:
    """--mmds FILE's JSON (read before anything is built: a bad file is one line)."""
    if args.mmds is None:
        if args.mmds_version is not None:
            raise PyvmmError("--mmds-version needs --mmds FILE")
        return None
    import json
    try:
        return json.loads(args.mmds.read_bytes())
    except OSError as exc:
        raise PyvmmError(f"cannot read --mmds {args.mmds}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:
        raise PyvmmError(f"--mmds {args.mmds} is not valid JSON: {exc}") from None


def _apply_mmds(spec, args: argparse.Namespace) -> None:
    """--mmds on a VM built from flags: MMDS on every interface unless configured."""
    if args.mmds is None or spec.mmds_config is not None:
        if args.mmds_version is not None and spec.mmds_config is not None:
            raise PyvmmError("--mmds-version cannot change the config file's mmds-config")
        return
    if not spec.network_interfaces:
        raise PyvmmError("--mmds needs a --net interface: the guest reaches MMDS through "
                         "virtio-net (no TAP traffic is involved)")
    from pyvmm.mmds.config import MmdsConfig
    spec.put_mmds_config(MmdsConfig(version=args.mmds_version or "V2",
                                    network_interfaces=list(spec.network_interfaces)))


def cmd_run(args: argparse.Namespace) -> int:
    if args.no_api and args.api_sock is not None:
        raise PyvmmError("--no-api and --api-sock contradict each other: pick one")
    request = load_request_from_args(args)
    if request is not None and request.resume_vm is False and args.api_sock is None:
        raise PyvmmError("--paused needs --api-sock: nothing could resume the VM otherwise")
    metadata = _read_mmds(args)
    _bind_api_socket(args)
    try:
        if request is None:
            spec = spec_from_args(args)
            _apply_gdb(spec, args)
            _apply_mmds(spec, args)
            with _microvm(spec, args) as vm:
                if metadata is not None:
                    vm.mmds.put(metadata)
                return _serve_vm(vm, args, start=True)
        if args.gdb is not None:
            raise PyvmmError("--gdb cannot be combined with restoring a snapshot yet")
        if args.mmds_version is not None:
            raise PyvmmError("--mmds-version cannot change a snapshot's MMDS configuration")
        from pyvmm.config import VmSpec
        with _microvm(VmSpec(), args) as vm:
            vm.load_snapshot(request)
            if metadata is not None:
                if vm.spec.mmds_config is None:
                    raise PyvmmError("--mmds: the snapshot's VM has no MMDS configured "
                                     "(its mmds-config is empty), so its guest cannot read it")
                vm.mmds.put(metadata)       # a snapshot holds MMDS's config, never its data
            return _serve_vm(vm, args, start=False)
    finally:
        if args.http is not None:
            args.http.close()


def cmd_snapshot(args: argparse.Namespace) -> int:
    from pyvmm import snapshot
    from pyvmm.snapshot.format import describe
    if args.snapshot_command == "info":
        path = args.file / SNAPSHOT_STATE if args.file.is_dir() else args.file
        text = describe(path)
        try:
            print(text, flush=True)
        except BrokenPipeError:
            # `pyvmm snapshot info F | head`: the reader has what it wanted.  stdout
            # goes to /dev/null so that the flush at exit is quiet too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.snapshot_command == "merge":
        copied = snapshot.merge(args.base_mem, args.diff_state, args.diff_mem)
        print(f"merged {copied >> 10} KiB of dirty pages into {args.base_mem}; it now goes "
              f"with {args.diff_state}")
        return 0
    return _create_through_api(args)


def _create_through_api(args: argparse.Namespace) -> int:
    from pyvmm.api.client import ApiClient
    args.dir.mkdir(parents=True, exist_ok=True)
    state, mem = (args.dir / SNAPSHOT_STATE).resolve(), (args.dir / SNAPSHOT_MEM).resolve()
    try:
        client = ApiClient(str(args.api_sock), timeout=600)
        status, body = client.get("/")
    except OSError as exc:
        raise PyvmmError(f"cannot reach the API at {args.api_sock}: {exc.strerror or exc}") \
            from None

    def call(method: str, url: str, payload: dict) -> None:
        status, body = client.request(method, url, payload)
        if status >= 300:
            raise PyvmmError(f"{method} {url}: {(body or {}).get('fault_message', status)}")
    paused_before = body.get("state") == "Paused"
    if not paused_before:
        call("PATCH", "/vm", {"state": "Paused"})
    try:
        call("PUT", "/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(mem),
                                         "snapshot_type": "Diff" if args.diff else "Full"})
    finally:
        if not paused_before and not args.keep_paused:
            call("PATCH", "/vm", {"state": "Resumed"})
    print(f"snapshot written: {state} and {mem}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    _bind_api_socket(args)
    try:
        from pyvmm.config import VmSpec
        with _microvm(VmSpec(), args) as vm:
            return _serve_vm(vm, args, start=False)
    finally:
        args.http.close()


def cmd_guest(args: argparse.Namespace) -> int:
    import dataclasses

    from pyvmm import builtin_guest
    if args.guest_command == "build":
        paths = builtin_guest.build_guest(progress=True) if args.force else \
            builtin_guest.ensure_guest(progress=True)
    else:
        found = builtin_guest.find_guest()
        if found is None:
            raise PyvmmError("the built-in guest is not built yet: run `pyvmm guest build`")
        paths = found
    for field in dataclasses.fields(paths):
        print(f"{field.name}={getattr(paths, field.name)}")
    return 0


def user_error_exit(command: str, run: Callable[[], int], status: int = EXIT_ERROR) -> int:
    """run(), with a user error (a PyvmmError, or an OSError naming a file) turned into
    one line on stderr and `status` instead of a traceback."""
    try:
        return run()
    except PyvmmError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return status
    except OSError as exc:
        print(f"{command}: error: {exc.strerror or exc}"
              f"{': ' + str(exc.filename) if exc.filename else ''}", file=sys.stderr)
        return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["jail"]:                  # its own argv: pyvmm's arguments after --
        from pyvmm import cli_jail
        return cli_jail.main(argv[1:])
    args = _build_parser().parse_args(argv)
    try:
        return user_error_exit("pyvmm", lambda: _dispatch(args))
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return cmd_run(args)
    if args.command == "api":
        return cmd_api(args)
    if args.command == "profile":
        from pyvmm import cli_profile
        return cli_profile.cmd_profile(args)
    if args.command == "trace":
        from pyvmm import cli_trace
        return cli_trace.cmd_trace(args)
    if args.command == "stat":
        from pyvmm import cli_stat
        return cli_stat.cmd_stat(args)
    if args.command == "snapshot":
        return cmd_snapshot(args)
    if args.command in ("exec", "cp", "sandbox"):
        from pyvmm import cli_sandbox
        return getattr(cli_sandbox, f"cmd_{args.command}")(args)
    return cmd_guest(args)


if __name__ == "__main__":
    sys.exit(main())

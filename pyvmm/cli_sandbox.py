"""`pyvmm exec`, `pyvmm cp` and `pyvmm sandbox`: commands and files through the guest agent.

    pyvmm run --vsock cid=3,uds=/tmp/vm.sock &          # any guest with the agent
    pyvmm exec --vsock /tmp/vm.sock -- uname -a
    pyvmm cp --vsock /tmp/vm.sock ./data.csv guest:/root/data.csv
    pyvmm sandbox run -- sh -c 'echo hi; exit 3'        # a disposable VM from a snapshot

`exec` streams the command's stdout and stderr to ours as they come and exits
with its exit code (128 + the signal if a signal ended it, as a shell does).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pyvmm.errors import PyvmmError

GUEST_PREFIX = "guest:"
DEFAULT_AGENT_PORT = 1024
STDIN_CHUNK = 64 * 1024


def add_parsers(sub: Any, parser_class: type, parse_mem: Any) -> None:
    exec_ = sub.add_parser("exec", help="run a command in a guest through its agent")
    _add_target_flags(exec_)
    _add_command_flags(exec_)

    cp = sub.add_parser("cp", help="copy a file into or out of a guest through its agent")
    _add_target_flags(cp)
    cp.add_argument("source", metavar="SRC", help="a host path, or guest:PATH")
    cp.add_argument("dest", metavar="DST", help="a host path, or guest:PATH (exactly one side "
                                                "is guest:)")
    cp.add_argument("--mode", type=lambda t: int(t, 8), default=None,
                    help="the guest file's mode in octal (default: the host file's)")

    sandbox = sub.add_parser("sandbox", help="disposable microVMs started from a snapshot")
    sandbox_sub = sandbox.add_subparsers(dest="sandbox_command", required=True,
                                         parser_class=parser_class)
    run = sandbox_sub.add_parser("run", help="run one command in a fresh sandbox, then discard it")
    _add_shape_flags(run, parse_mem)
    run.add_argument("--lifetime", type=float, default=None, metavar="SECONDS",
                     help="kill the sandbox's VM after this many seconds of wall-clock time")
    run.add_argument("--cold", action="store_true",
                     help="boot the sandbox from scratch instead of from its snapshot")
    _add_command_flags(run)
    prepare = sandbox_sub.add_parser("prepare", help="make the cached snapshot sandboxes start "
                                                     "from (one cold boot; done on first use)")
    _add_shape_flags(prepare, parse_mem)


def _add_target_flags(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--api-sock", type=Path, help="the VM's API socket (its vsock's "
                                                      "uds_path is asked from GET /vm/config)")
    target.add_argument("--vsock", type=Path, metavar="UDS_PATH",
                        help="the VM's vsock Unix socket (its uds_path)")
    parser.add_argument("--port", type=int, default=DEFAULT_AGENT_PORT,
                        help=f"the agent's vsock port (default {DEFAULT_AGENT_PORT})")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for the agent to answer (default 10)")


def _add_command_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="an environment variable for the command (repeatable)")
    parser.add_argument("--cwd", default=None, metavar="DIR", help="its working directory")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="kill the command (and its process group) after this long")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="stream our stdin to the command (else it reads nothing)")
    parser.add_argument("-t", "--tty", action="store_true",
                        help="give the command a pseudo-terminal (stderr then joins stdout)")
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...",
                        help="the command")


def _add_shape_flags(parser: argparse.ArgumentParser, parse_mem: Any) -> None:
    parser.add_argument("--mem", type=parse_mem, default=None,
                        help="guest RAM in MiB, or with M/G (default 512)")
    parser.add_argument("--cpus", type=int, default=None, help="number of vCPUs (default 1)")
    parser.add_argument("--tap", default=None, metavar="NAME",
                        help="a TAP device for the sandbox's network (default: no network)")


# -- reaching an agent ----------------------------------------------------------------

def _uds_path(args: argparse.Namespace) -> str:
    if args.vsock is not None:
        return str(args.vsock)
    from pyvmm.api.client import ApiClient
    try:
        with ApiClient(str(args.api_sock), timeout=10) as client:
            status, config = client.get("/vm/config")
    except OSError as exc:
        raise PyvmmError(f"cannot reach the API at {args.api_sock}: {exc.strerror or exc}") \
            from None
    vsock = (config or {}).get("vsock") if status == 200 else None
    if not vsock:
        raise PyvmmError(f"the VM behind {args.api_sock} has no vsock device, so its agent "
                         "cannot be reached: configure one with PUT /vsock before start")
    return vsock["uds_path"]


def _client(args: argparse.Namespace):
    """The agent, each connection retried for --connect-timeout while the guest is not
    listening yet (one command needs no separate "is it up" round trip first)."""
    from pyvmm.agent.client import Agent, connect_vsock_uds
    uds_path, port, timeout = _uds_path(args), args.port, args.connect_timeout
    return Agent(lambda: connect_vsock_uds(uds_path, port, timeout))


def _command(args: argparse.Namespace) -> list[str]:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise PyvmmError("no command given: put it after --, e.g. `-- uname -a`")
    return argv


def _environment(args: argparse.Namespace) -> dict[str, str] | None:
    env = {}
    for text in args.env:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise PyvmmError(f"bad --env {text!r}: use NAME=VALUE")
        env[key] = value
    return env or None


# -- streaming a command --------------------------------------------------------------

def stream_command(start: Any, args: argparse.Namespace) -> int:
    """Start the command through start(argv, **options) (an agent client's or a
    sandbox's), copy its output to ours as it comes, and return its exit status."""
    process = start(_command(args), env=_environment(args), cwd=args.cwd,
                    timeout=args.timeout, pty=args.tty, stdin=args.interactive)
    if args.interactive:
        process.feed_stdin(_stdin_chunks())
    out, err = sys.stdout.buffer, sys.stderr.buffer
    for kind, data in process:
        if kind == "stdout":
            out.write(data)
            out.flush()
        elif kind == "stderr":
            err.write(data)
            err.flush()
    result = process.wait()
    if result.timed_out:
        print(f"pyvmm: the command ran longer than {args.timeout:g} s: it was killed with "
              "its process group", file=sys.stderr)
    return result.returncode


def _stdin_chunks():
    """Our stdin as it comes (os.read returns what a pipe or terminal has), until EOF."""
    while data := os.read(sys.stdin.fileno(), STDIN_CHUNK):
        yield data


# -- the commands ---------------------------------------------------------------------

def cmd_exec(args: argparse.Namespace) -> int:
    _command(args)                       # a missing command is an error before connecting
    return stream_command(_client(args).start, args)


def cmd_cp(args: argparse.Namespace) -> int:
    src_guest, dst_guest = (p.startswith(GUEST_PREFIX) for p in (args.source, args.dest))
    if src_guest == dst_guest:
        raise PyvmmError("pyvmm cp copies between the host and a guest: write exactly one of "
                         f"SRC and DST as {GUEST_PREFIX}PATH")
    client = _client(args)
    if dst_guest:
        path = args.dest[len(GUEST_PREFIX):]
        with open(args.source, "rb") as src:
            mode = args.mode if args.mode is not None else os.fstat(src.fileno()).st_mode & 0o7777
            client.put_file(path, src, mode=mode, mkdirs=True)
        return 0
    path = args.source[len(GUEST_PREFIX):]
    target = Path(args.dest)
    if target.is_dir():
        target = target / Path(path).name
    tmp = target.with_name(f".{target.name}.pyvmm-cp")
    try:
        with open(tmp, "wb") as dst:
            client.get_file(path, dst)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from pyvmm.sandbox import DEFAULT_MEM_MIB, DEFAULT_VCPUS, Sandbox, ensure_template
    mem = args.mem or DEFAULT_MEM_MIB
    cpus = args.cpus or DEFAULT_VCPUS
    log = lambda text: print(f"pyvmm: {text}", file=sys.stderr)   # noqa: E731
    if args.sandbox_command == "prepare":
        template = ensure_template(mem, cpus, args.tap, log)
        print(template.directory)
        return 0
    _command(args)                       # a missing command is an error before any boot
    with Sandbox(mem_mib=mem, vcpus=cpus, tap=args.tap, lifetime=args.lifetime,
                 cold=args.cold, log=log) as sandbox:
        return stream_command(sandbox.start_process, args)

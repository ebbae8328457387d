"""virtio-net on TAP in a Linux guest: TCP throughput each way, pyvmm against QEMU.

A network namespace of our own holds a TAP device (172.31.250.1/24 on the
host side) and a Python TCP peer; the VMM runs inside it (`ip netns exec`), so
no traffic leaves the namespace.  The built-in guest (PVH vmlinux, 256 MiB,
1 vCPU) with /bin/benchtool in its initramfs runs
`benchtool net eth0 172.31.250.2 172.31.250.1 MIB SECONDS`, which sets the
address with ioctls (no `ip` processes, each of which costs seconds on KVM
PVM), then:

  rx (host -> guest)  connects to port 5201; the peer sends MIB MiB (or for
                      SECONDS) and closes; timed in the guest, first byte to EOF
  tx (guest -> host)  connects to port 5202 and sends MIB MiB (or for SECONDS);
                      timed by the peer, first byte to EOF

QEMU: -netdev tap,ifname=TAP,script=no,downscript=no -device virtio-net-device
(vhost off: QEMU's own userspace virtio-net, like pyvmm's).  One boot per VMM
per repetition: `--io-reps N` for more.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
from typing import Any

from benches import blk, harness, vmms

MAC = "06:00:ac:1f:fa:02"
METRICS = (("rx", "MBps", "TCP host->guest MB/s"), ("tx", "MBps", "TCP guest->host MB/s"))

PEER = r"""
import json, socket, sys, threading, time
host, mib, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {}
def listener(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1); s.settimeout(1800)
    return s
send_sock, recv_sock = listener(5201), listener(5202)
print("PEER-READY", flush=True)
c, _ = send_sock.accept()
buf = b"\xa5" * (256 * 1024); sent = 0; t0 = time.perf_counter()
try:
    while sent < mib << 20 and time.perf_counter() - t0 < seconds:
        c.sendall(buf); sent += len(buf)
except OSError as exc:
    out["send_error"] = str(exc)
c.close(); out["sent"] = sent
c, _ = recv_sock.accept()
got = 0; first = last = None
while True:
    chunk = c.recv(1 << 20)
    if not chunk:
        break
    last = time.perf_counter()
    if first is None:
        first = last
    got += len(chunk)
c.close()
out["received"] = got
out["tx_seconds"] = (last - first) if got else None
out["tx_MBps"] = got / (last - first) / 1e6 if got and last > first else None
print("PEER-RESULT " + json.dumps(out), flush=True)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    harness.add_options(parser, "net", [
        ("--net-mib", int, 8, "MiB sent each way (default 8)"),
        ("--net-seconds", float, 60.0, "at most this long each way (default 60)")])


def main(args: argparse.Namespace) -> dict[str, Any]:
    qemu = vmms.ensure_qemu()
    vmms.warm_bytecode()
    guest = vmms.builtin_guest()
    initrd = vmms.initramfs_with_tool(guest.initramfs)
    ns = vmms.bench_netns(f"pyvmm-bench-{os.getpid()}")
    cmd = (f'pyvmm.cmd="/bin/benchtool net eth0 {ns.guest_ip} {ns.host_ip} {args.net_mib} '
           f'{args.net_seconds}"')
    full = vmms.pyvmm_full_cmdline(guest.vmlinux, initrd, cmd, blk.MEM_MIB)
    facts = harness.machine_facts()
    print(f"{harness.format_facts(facts)}\n{qemu['version']}\n"
          f"{args.io_reps} boot(s) per VMM (Linux boots are slow on KVM PVM; --io-reps N); "
          f"{blk.MEM_MIB} MiB, 1 vCPU; {args.net_mib} MiB each way (at most "
          f"{args.net_seconds} s); namespace {ns.name}, TAP {ns.tap}", flush=True)
    samples: dict[str, list[dict]] = {v: [] for v in blk.VMMS}
    try:
        for rep in range(args.io_reps):
            for vmm in harness.rotated(blk.VMMS, rep):
                peer = ns.python(PEER, ns.host_ip, str(args.net_mib), str(args.net_seconds),
                                 stdout=subprocess.PIPE, text=True)
                assert peer.stdout.readline().strip() == "PEER-READY"
                try:
                    sample = blk.run_io_guest(vmm, guest, initrd, cmd, full,
                                              taps=[(ns.tap, MAC)], wrap=ns.wrap,
                                              last=b"BENCH tx", timeout=args.io_timeout)
                    if "tx" not in sample["results"]:
                        peer.kill()             # the guest never got there: don't wait
                    out, _ = peer.communicate(timeout=60)
                except BaseException:
                    peer.kill()
                    raise
                for line in out.splitlines():
                    if line.startswith("PEER-RESULT "):
                        sample["peer"] = json.loads(line.split(" ", 1)[1])
                # tx is timed where it is received (the host); the guest's own is kept too.
                res = sample["results"]
                if "tx" in res:
                    res["tx_guest"] = dict(res["tx"])
                    if sample.get("peer", {}).get("tx_MBps"):
                        res["tx"]["MBps"] = sample["peer"]["tx_MBps"]
                samples[vmm].append(sample)
                print(f"  rep {rep + 1} {vmm:6s} boot {sample['boot_s']} s  "
                      f"{res or sample.get('console_tail', '')[-1500:]}  peer "
                      f"{sample.get('peer')}", flush=True)
    finally:
        ns.delete()
    return blk.report("net", "virtio-net", samples, METRICS, facts, qemu, args, guest, initrd,
                      full, {"mib": args.net_mib, "seconds": args.net_seconds},
                      goal=f"pyvmm >= {blk.GOAL}x QEMU each way",
                      qemu_setting=("-netdev tap,ifname=TAP,script=no,downscript=no "
                                    "-device virtio-net-device",
                                    "the TAP in our namespace; QEMU's userspace virtio-net "
                                    "(no vhost)"),
                      fmt=".3f")

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    blk.add_arguments(p)
    add_arguments(p)
    main(p.parse_args())

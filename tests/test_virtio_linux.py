"""virtio-blk, virtio-net and virtio-rng against a real Linux guest booted by
pyvmm.  One VM carries every device (a boot costs about a minute on KVM PVM hosts);
the host checks what the guest did after it has shut down.

The guest's initramfs gets /bin/zeroout, a few lines of freestanding C (busybox
has blkdiscard for DISCARD, but nothing that sends WRITE_ZEROES): it calls the
BLKZEROOUT ioctl, which Linux turns into virtio-blk WRITE_ZEROES requests.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time

import pytest

from tests.framework.images import cpio_newc
from tests.framework.microvm import run_in_shell
from tests.framework.netns import GUEST_IP, HOST_IP

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MAC = "06:00:ac:1e:00:02"
PATTERN_BYTES = 1 << 20
TCP_BYTES = 256 * 1024
# Everything in the guest kernel is emulated on KVM PVM hosts: file system and
# block work take minutes there.
SLOW = 900


# Inside the pattern on /dev/vdb: a range the guest discards and one it zeroes.
DISCARD_AT, DISCARD_BYTES = 128 << 10, 256 << 10
ZERO_AT, ZERO_BYTES = 640 << 10, 64 << 10

ZEROOUT_C = r"""
/* zeroout DEV OFFSET LENGTH: BLKZEROOUT on the range; exit status 0 if it worked.
   Freestanding (no libc): a few hundred bytes in the initramfs. */
#include <linux/fs.h>

static long sys3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile ("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c)
                      : "rcx", "r11", "memory");
    return r;
}

static unsigned long long number(const char *s) {
    unsigned long long v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (unsigned long long)(*s++ - '0');
    return v;
}

void start(long *sp) {
    char **argv = (char **)(sp + 1);
    unsigned long long range[2];
    long fd;
    if (sp[0] != 4)
        sys3(60, 2, 0, 0);                       /* exit(2): usage */
    fd = sys3(2, (long)argv[1], 2, 0);           /* open(DEV, O_RDWR) */
    if (fd < 0)
        sys3(60, 3, 0, 0);
    range[0] = number(argv[2]);
    range[1] = number(argv[3]);
    sys3(60, sys3(16, fd, BLKZEROOUT, (long)range) < 0, 0, 0);   /* ioctl, exit */
}

__asm__(".globl _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call start\n hlt\n");
"""


def expected_pattern() -> bytes:
    pattern = bytearray(b"p" * PATTERN_BYTES)  # zeros turned into 'p' by tr in the guest
    for at, length in ((DISCARD_AT, DISCARD_BYTES), (ZERO_AT, ZERO_BYTES)):
        pattern[at:at + length] = bytes(length)
    return bytes(pattern)


@pytest.fixture(scope="module")
def initramfs(guest, tmp_path_factory):
    """The built-in initramfs with /bin/zeroout appended as a second archive (Linux
    unpacks concatenated archives in order)."""
    d = tmp_path_factory.mktemp("initramfs")
    source, tool = d / "zeroout.c", d / "zeroout"
    source.write_text(ZEROOUT_C)
    subprocess.run(["gcc", "-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin",
                    "-fno-stack-protector", "-fno-pie", "-no-pie", "-o", str(tool), str(source)],
                   check=True)
    blob = guest.initramfs.read_bytes()
    blob += b"\0" * (-len(blob) % 4)
    out = d / "initramfs.cpio"
    out.write_bytes(blob + cpio_newc([("bin/zeroout", 0o100755, tool.read_bytes())]))
    return out


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    d = tmp_path_factory.mktemp("disks")
    ext4, raw, ro, io_uring = d / "ext4.img", d / "raw.img", d / "ro.img", d / "async.img"
    with open(ext4, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(ext4)], check=True)
    raw.write_bytes(bytes(4 << 20))
    ro.write_bytes(os.urandom(1 << 20))
    io_uring.write_bytes(bytes(2 << 20))
    return {"ext4": ext4, "raw": raw, "ro": ro, "async": io_uring,
            "ro_sha": hashlib.sha256(ro.read_bytes()).hexdigest()}


def drive(drive_id: str, path, read_only: bool = False, io_engine: str = "Sync") -> dict:
    return {"drive_id": drive_id, "path_on_host": str(path), "is_root_device": False,
            "is_read_only": read_only, "io_engine": io_engine}


@pytest.fixture(scope="module")
def vm(guest, initramfs, disks, netns, module_microvm_factory):
    """The built-in guest (with /bin/zeroout) with three disks, a NIC on the TAP in the
    test's namespace (netns, conftest.py) and an entropy device, eth0 up."""
    machine = module_microvm_factory.boot(
        kernel=guest.vmlinux, initrd=initramfs, mem_mib=256, rng=True,
        drives=[drive("ext4", disks["ext4"]), drive("raw", disks["raw"]),
                drive("ro", disks["ro"], read_only=True),
                drive("async", disks["async"], io_engine="Async")],      # /dev/vdd: io_uring
        nets=[{"iface_id": "eth0", "host_dev_name": netns.tap, "guest_mac": MAC}],
        netns=netns)                       # the TAP lives in the test's namespace
    # Kernel messages (e.g. "random: crng init done", EXT4 mount notes) would land in
    # the middle of the commands' output on the shared console: keep them off it.
    run_in_shell(machine, f"dmesg -n 1 && ip addr add {GUEST_IP}/24 dev eth0 && "
                          "ip link set eth0 up")
    return machine


def test_the_guest_sees_three_disks_with_their_sizes(vm, disks):
    out = run_in_shell(vm, "cat /sys/block/vda/size /sys/block/vdb/size /sys/block/vdc/size "
                           "/sys/block/vdc/ro").split()
    assert out == [str((32 << 20) // 512), str((4 << 20) // 512), str((1 << 20) // 512), "1"]


def test_ext4_made_on_the_host_mounts_and_takes_files(vm):
    out = run_in_shell(vm, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && "
                           "echo from-the-guest > /mnt/hello && mkdir /mnt/dir && "
                           "dd if=/dev/zero of=/mnt/dir/big bs=1k count=20 2>/dev/null && sync && "
                           "cat /mnt/hello && umount /mnt && echo UNMOUNTED", timeout=SLOW)
    assert "from-the-guest" in out and "UNMOUNTED" in out


def test_a_pattern_written_raw(vm):
    # No `yes | head`: every process here ends by EOF, none by SIGPIPE.
    out = run_in_shell(vm, f"dd if=/dev/zero bs=65536 count={PATTERN_BYTES // 65536} "
                           "2>/dev/null | tr '\\0' p | dd of=/dev/vdb bs=65536 conv=fsync 2>&1; "
                           "sync", timeout=SLOW)
    assert "records out" in out


def zeros_read_back(vm, at: int, length: int) -> bool:
    """Whether the guest reads [at, at+length) of /dev/vdb as zeros (4 KiB aligned)."""
    # od folds repeated lines into "*".
    out = run_in_shell(vm, f"od -An -tx1 -j {at} -N {length} /dev/vdb", timeout=SLOW)
    words = out.split()
    return "00" in words and set(words) <= {"00", "*"}


def test_discard_and_write_zeroes_in_the_pattern(vm):
    # After test_a_pattern_written_raw: DISCARD (blkdiscard) and WRITE_ZEROES
    # (BLKZEROOUT) on two ranges inside the pattern.
    out = run_in_shell(vm, f"blkdiscard -o {DISCARD_AT} -l {DISCARD_BYTES} /dev/vdb && "
                           f"zeroout /dev/vdb {ZERO_AT} {ZERO_BYTES} && sync; echo rc=$?",
                       timeout=SLOW)
    assert "rc=0" in out, out
    stats = vm.stats["virtio"]["drive:raw"]
    assert stats["bytes_discarded"] == DISCARD_BYTES, stats
    assert stats["bytes_zeroed"] == ZERO_BYTES, stats
    assert stats["error"] is None
    assert zeros_read_back(vm, ZERO_AT, ZERO_BYTES)


ASYNC_BYTES = 512 << 10
ASYNC_DD = f"bs=65536 count={ASYNC_BYTES // 65536}"     # dd's arguments for ASYNC_BYTES


def test_an_async_disk_writes_flushes_and_reads_back(vm):
    # io_engine "Async": the guest's writeback sends many requests at once, completed
    # out of order through io_uring; conv=fsync sends a flush; reading back after
    # dropping the guest's page cache goes to the device again.  The data is the
    # read-only disk's random bytes (no two 4 KiB blocks alike, so a block at the
    # wrong offset shows), moved with dd only: busybox seq and head -c make a system
    # call every few bytes, and on KVM PVM that took two minutes each (CI: 736 s).
    out = run_in_shell(vm, f"dd if=/dev/vdc of=/tmp/pattern {ASYNC_DD} "
                           "2>/dev/null && "
                           "dd if=/tmp/pattern of=/dev/vdd bs=4096 conv=fsync 2>/dev/null && "
                           "echo 3 > /proc/sys/vm/drop_caches && "
                           f"dd if=/dev/vdd of=/tmp/back {ASYNC_DD} "
                           "2>/dev/null && cmp /tmp/back /tmp/pattern && echo SAME",
                       timeout=SLOW)
    assert "SAME" in out, out
    stats = vm.stats["virtio"]["drive:async"]
    assert stats["bytes_written"] >= ASYNC_BYTES and stats["bytes_read"] >= ASYNC_BYTES, stats
    assert stats["errors"] == 0 and stats["error"] is None, stats


def test_the_read_only_disk_refuses_writes(vm):
    out = run_in_shell(vm, "dd if=/dev/zero of=/dev/vdc bs=512 count=1 2>&1; echo rc=$?")
    assert "rc=1" in out


def test_hwrng_gives_random_bytes(vm):
    # One process reads /dev/hwrng and prints it.
    out = run_in_shell(vm, "od -An -tx1 -N32 /dev/hwrng")
    hexdigits = "".join(re.findall(r"\b[0-9a-f]{2}\b", out))
    assert len(hexdigits) == 64 and hexdigits != "0" * 64, out
    assert vm.stats["virtio"]["entropy"]["bytes_read"] >= 32


def test_the_mac_set_on_the_host_is_the_guests(vm):
    assert MAC in run_in_shell(vm, "cat /sys/class/net/eth0/address")


def test_ping_between_guest_and_host(vm, netns):
    out = run_in_shell(vm, f"ping -c 3 -W 5 {HOST_IP}", timeout=SLOW)
    assert "3 packets received" in out
    host = netns.run("ping", "-c", "2", "-W", "5", GUEST_IP, capture_output=True, text=True)
    assert host.returncode == 0, host.stdout


def test_tcp_host_to_guest_and_back_checksummed(vm, netns):
    payload = os.urandom(TCP_BYTES)
    digest = hashlib.sha256(payload).hexdigest()
    # host -> guest: the guest listens, the host connects and sends.  The job's
    # stdin is /dev/null: a background job that reads the console tty is
    # stopped by SIGTTIN, and the file would end wherever that happened.
    vm.serial.write("nc -l -p 5001 < /dev/null > /tmp/in & echo LISTEN-$((1+1))\n")
    vm.serial.expect(b"LISTEN-2", timeout=60)
    time.sleep(1)
    sender = netns.python(f"""
import socket, sys, time
data = sys.stdin.buffer.read()
for _ in range(20):
    try:
        c = socket.create_connection(("{GUEST_IP}", 5001), timeout=60)
        break
    except OSError:
        time.sleep(0.5)
c.sendall(data); c.close()
""", stdin=subprocess.PIPE)
    sender.communicate(payload, timeout=300)
    assert sender.returncode == 0
    out = run_in_shell(vm, "wait; wc -c < /tmp/in; sha256sum /tmp/in", timeout=SLOW)
    assert out.split()[:2] == [str(TCP_BYTES), digest], out
    # guest -> host: the host listens, the guest sends the same bytes back.
    receiver = netns.python(f"""
import hashlib, socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{HOST_IP}", 5002)); s.listen(1); s.settimeout(300)
c, _ = s.accept(); data = b""
while len(data) < {TCP_BYTES}:
    chunk = c.recv(65536)
    if not chunk:
        break
    data += chunk
c.close(); print(len(data), hashlib.sha256(data).hexdigest())
""", stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    run_in_shell(vm, f"nc {HOST_IP} 5002 < /tmp/in", timeout=SLOW)
    got, _ = receiver.communicate(timeout=300)
    assert got.split() == [str(TCP_BYTES), digest]
    stats = vm.stats["virtio"]["net:eth0"]
    assert stats["rx_packets"] > 0 and stats["tx_packets"] > 0 and stats["error"] is None


def punches_holes(directory) -> bool:
    """Whether fallocate(PUNCH_HOLE) works on files in directory."""
    import ctypes
    probe = directory / "punch-probe"
    probe.write_bytes(b"x" * 8192)
    fd = os.open(probe, os.O_RDWR)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.fallocate(fd, 0x03, ctypes.c_long(0), ctypes.c_long(4096)) == 0
    finally:
        os.close(fd)
        probe.unlink()


def test_after_shutdown_the_host_reads_what_the_guest_wrote(vm, disks):
    vm.serial.write("exit\n")
    result = vm.wait(120)
    assert result is not None and result.exit_code == 0, result
    raw = disks["raw"].read_bytes()
    # The discarded range reads back as zeros where the host file system punches
    # holes (ext4, xfs, tmpfs); discarding is advisory elsewhere.
    if not punches_holes(disks["raw"].parent):
        raw = raw[:DISCARD_AT] + b"p" * DISCARD_BYTES + raw[DISCARD_AT + DISCARD_BYTES:]
    assert hashlib.sha256(raw[:PATTERN_BYTES]).digest() == \
        hashlib.sha256(expected_pattern()).digest()
    assert raw[PATTERN_BYTES:] == bytes(len(raw) - PATTERN_BYTES)
    fsck = subprocess.run(["e2fsck", "-fn", str(disks["ext4"])], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /hello", str(disks["ext4"])],
                         capture_output=True, text=True)
    assert cat.stdout.strip() == "from-the-guest"
    read_only = disks["ro"].read_bytes()
    assert hashlib.sha256(read_only).hexdigest() == disks["ro_sha"]
    written = disks["async"].read_bytes()       # the io_engine "Async" disk
    assert written[:ASYNC_BYTES] == read_only[:ASYNC_BYTES]
    assert written[ASYNC_BYTES:] == bytes(len(written) - ASYNC_BYTES)

#!/bin/bash
# Build the pyvmm guest initramfs: an uncompressed newc cpio holding the
# static busybox from Debian's busybox-static, /bin/sh -> busybox (its ash
# runs every applet without symlinks), /dev/console, /etc/fstab,
# firmware/init, the guest agent as /sbin/pyvmm-agent and the mount points
# of the sandbox root (/sandbox/lower, /sandbox/root: see firmware/init).
# Uncompressed on purpose: decompressing in the guest kernel is emulated on
# KVM PVM hosts and costs far more than copying.
#
# usage: build-initramfs.sh OUTFILE AGENT
#   AGENT: the static pyvmm-agent binary (firmware/agent/build.sh)
# Installs nothing.  Needs these Debian packages (also in apt-packages.txt):
#   busybox-static python3
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-initramfs.sh OUTFILE AGENT}
agent=${2:?usage: build-initramfs.sh OUTFILE AGENT}
busybox=/bin/busybox

die() { echo "build-initramfs: error: $*" >&2; exit 1; }
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" \
    || die "busybox-static is not installed: apt-get install busybox-static"
file=$(dpkg-query -L busybox-static | grep -x '/bin/busybox\|/usr/bin/busybox' | head -n1)
[ -n "$file" ] && busybox=$file
command -v python3 >/dev/null || die "python3 not found: apt-get install python3"
[ -f "$agent" ] || die "no agent binary at $agent"

python3 - "$out" "$busybox" "$here/init" "$agent" <<'PY'
import os, sys

out, busybox, init, agent = sys.argv[1:]

def entry(name, mode, data=b"", rdev=(0, 0), ino=[0]):
    ino[0] += 1
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join("%08X" % v for v in (
        ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
    pad = lambda n: b"\0" * (-n % 4)
    return hdr.encode() + nb + pad(110 + len(nb)) + data + pad(len(data))

DIR, REG, LNK, CHR = 0o040000, 0o100000, 0o120000, 0o020000
parts = [entry(d, DIR | 0o755) for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "root", "etc",
                                         "sandbox", "sandbox/lower", "sandbox/root")]
parts.append(entry("dev/console", CHR | 0o600, rdev=(5, 1)))
parts.append(entry("bin/busybox", REG | 0o755, open(busybox, "rb").read()))
parts.append(entry("bin/sh", LNK | 0o777, b"busybox"))
parts.append(entry("sbin/pyvmm-agent", REG | 0o755, open(agent, "rb").read()))
parts.append(entry("init", REG | 0o755, open(init, "rb").read()))
parts.append(entry("etc/fstab", REG | 0o644, b"proc /proc proc defaults 0 0\n"
                  b"sysfs /sys sysfs defaults 0 0\ndevtmpfs /dev devtmpfs defaults 0 0\n"
                  b"tmpfs /tmp tmpfs mode=1777 0 0\n"))
parts.append(entry("TRAILER!!!", 0))
blob = b"".join(parts)
tmp = out + ".tmp"
with open(tmp, "wb") as f:
    f.write(blob)
os.replace(tmp, out)
print("build-initramfs: wrote %s (%d bytes)" % (out, len(blob)))
PY

#!/bin/bash
# Build the Debian tree of the pyvmm sandbox root filesystem: bookworm
# (minbase) with the packages of firmware/rootfs/packages.txt (python3), as a
# tarball.  firmware/build-rootfs-image.sh turns it, plus the guest agent,
# into the ext4 image that firmware/init mounts read-only under a tmpfs
# overlay (pyvmm.rootfs=).  Two scripts, cached apart by
# pyvmm/builtin_guest.py, so that an agent change only redoes the image
# (seconds), not this (20-60 s, networked).
#
# usage: build-rootfs.sh OUT.tar
#
# mmdebstrap rather than debootstrap: one command resolves the packages with
# apt (debootstrap's own resolver installs a fixed base, then needs a second
# chroot'ed apt-get for python3), downloads in parallel and installs each
# package once (several times faster), writes a tarball directly, and works
# without root (--mode=unshare or fakechroot) as well as with it (CI).
#
# Environment:
#   PYVMM_DEBIAN_MIRROR  the Debian mirror (default http://deb.debian.org/debian;
#                        security updates come from .../debian-security beside it)
#
# Installs nothing.  Needs these Debian packages (also in apt-packages.txt):
#   mmdebstrap (with its recommends fakechroot/uidmap when not run as root).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-rootfs.sh OUT.tar}
suite=bookworm
mirror=${PYVMM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${mirror%/debian}/debian-security
t0=$SECONDS

step() { printf '[build-rootfs %4ds] %s\n' $((SECONDS - t0)) "$*"; }
die() { echo "build-rootfs: error: $*" >&2; exit 1; }
command -v mmdebstrap >/dev/null || die "mmdebstrap not found: apt-get install mmdebstrap"
packages=$(grep -v '^\s*\(#\|$\)' "$here/rootfs/packages.txt" | paste -sd, -)

step "mmdebstrap $suite (minbase + $packages) from $mirror"
# The image is only ever read by a program (the agent) and python: no
# manuals, documentation or translations (copyright files stay).
# apt's lists and caches are removed by mmdebstrap's own cleanup.  The
# merged-usr hook makes /bin etc. symlinks itself and installs
# usr-is-merged: without it apt satisfies init-system-helpers'
# "usrmerge | usr-is-merged" with usrmerge, which brings perl (50 MB).
# The hooks name the machine and drop the build host's resolv.conf, which
# mmdebstrap leaves in the tree.
mmdebstrap --variant=minbase --format=tar --include="$packages" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --customize-hook='echo pyvmm > "$1/etc/hostname"' \
    --customize-hook='printf "127.0.0.1\tlocalhost\n127.0.1.1\tpyvmm\n" > "$1/etc/hosts"' \
    --customize-hook='rm -f "$1/etc/resolv.conf"' \
    --quiet \
    "$suite" "$out.tmp" \
    "deb $mirror $suite main" \
    "deb $mirror $suite-updates main" \
    "deb $security $suite-security main"
mv -f "$out.tmp" "$out"
step "done: $(du -h "$out" | cut -f1) tarball $out"

#!/bin/bash
# Build the pyvmm sandbox root filesystem image: the Debian tree of
# firmware/build-rootfs.sh plus the guest agent as /usr/sbin/pyvmm-agent, as
# an ext4 image sized to its contents (mke2fs -d: no root, no loop device).
# firmware/init mounts it read-only under a tmpfs overlay (pyvmm.rootfs=).
#
# usage: build-rootfs-image.sh TREE.tar AGENT OUT.ext4
#
# Installs nothing.  Needs these Debian packages (also in apt-packages.txt):
#   e2fsprogs, and fakeroot when not run as root.
set -euo pipefail

usage="usage: build-rootfs-image.sh TREE.tar AGENT OUT.ext4"
tree=${1:?$usage} agent=${2:?$usage} out=${3:?$usage}
t0=$SECONDS

step() { printf '[build-rootfs-image %4ds] %s\n' $((SECONDS - t0)) "$*"; }
die() { echo "build-rootfs-image: error: $*" >&2; exit 1; }
[ -f "$tree" ] || die "no tree tarball at $tree"
[ -f "$agent" ] || die "no agent binary at $agent"
command -v mke2fs >/dev/null || die "mke2fs not found: apt-get install e2fsprogs"
# mke2fs -d copies owners, modes and device numbers from the directory, so the
# tree is unpacked and imaged in one fakeroot session when we are not root
# (where `id -u` says 0: this runs once more, inside it).
if [ "$(id -u)" != 0 ]; then
    command -v fakeroot >/dev/null || die "fakeroot not found: apt-get install fakeroot"
    exec fakeroot -- "$0" "$@"
fi

image() {
    local tree=$1 agent=$2 out=$3 dir=$4
    tar -C "$dir" -xpf "$tree" --numeric-owner
    install -m 0755 "$agent" "$dir/usr/sbin/pyvmm-agent"
    # Size: the tree's blocks plus 5% and 4 MiB for ext4's own metadata
    # (bitmaps, inode tables, directories), a few MiB left free; inodes: the
    # tree's plus 10%.  4 KiB blocks, no journal (mounted read-only: nothing
    # to replay), no blocks reserved for root.
    local kib files
    kib=$(du -sk "$dir" | cut -f1)
    files=$(find "$dir" -xdev | wc -l)
    mke2fs -q -F -t ext4 -b 4096 -O ^has_journal -m 0 -L pyvmm-rootfs \
        -N $((files + files / 10 + 64)) -d "$dir" "$out" $((kib + kib / 20 + 4096))K
}

work=$(mktemp -d "${TMPDIR:-/tmp}/pyvmm-rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/root"
step "unpacking $tree, adding $agent, mke2fs -d"
image "$tree" "$agent" "$out.tmp" "$work/root"
mv -f "$out.tmp" "$out"
step "done: $(du -k --apparent-size "$out" | cut -f1) KiB image ($(du -sk "$work/root" | cut -f1) KiB of files) $out"

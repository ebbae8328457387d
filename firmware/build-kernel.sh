#!/bin/bash
# Build the pyvmm guest kernel from Debian's linux-source-6.1.
#
# usage: build-kernel.sh OUTDIR
#   OUTDIR receives bzImage, vmlinux (ELF with the PVH note, stripped: what
#   pyvmm boots), vmlinux.debug (the same kernel unstripped, its symbol table
#   for gdb), config and System.map.
#   WORKDIR (env) is where the source is unpacked; default: a fresh temp dir,
#   removed afterwards unless KEEP_WORK=1.
#
# Installs nothing.  Needs these Debian packages (also in apt-packages.txt):
#   linux-source-6.1 build-essential bc flex bison libelf-dev lz4 cpio
#   xz-utils patch
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-kernel.sh OUTDIR}
tarball=/usr/src/linux-source-6.1.tar.xz
fragment=$here/kernel/microvm.config
jobs=$(nproc)
t0=$SECONDS

step() { printf '[build-kernel %4ds] %s\n' $((SECONDS - t0)) "$*"; }
die() { echo "build-kernel: error: $*" >&2; exit 1; }

[ -f "$tarball" ] || die "$tarball missing: apt-get install linux-source-6.1"
for tool in gcc make bc flex bison lz4 patch xz; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install \$(cat $here/apt-packages.txt)"
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "${WORKDIR:-}" ]; then
    work=$WORKDIR; mkdir -p "$work"
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/pyvmm-kernel.XXXXXX")
    [ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
fi

step "unpacking $tarball into $work"
rm -rf "$work/linux-source-6.1"
tar -C "$work" -xf "$tarball"
src=$work/linux-source-6.1
cd "$src"

for p in "$here"/kernel/patches/*.patch; do
    step "applying $(basename "$p")"
    patch -p1 --batch --forward --quiet < "$p"
done

export ARCH=x86_64 KBUILD_BUILD_USER=pyvmm KBUILD_BUILD_HOST=pyvmm
step "configuring: tinyconfig + $(basename "$fragment")"
make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make -s olddefconfig

# Every option the fragment asks for must have survived olddefconfig
# (a missing dependency silently drops it otherwise).
step "checking that every requested option is in .config"
awk '
    /^CONFIG_[A-Za-z0-9_]+=/ { n = index($0, "="); want[substr($0, 1, n - 1)] = $0; next }
    /^# CONFIG_[A-Za-z0-9_]+ is not set/ { want[$2] = ""; next }
    END {
        while ((getline line < cfg) > 0)
            if (line ~ /^CONFIG_/) { n = index(line, "="); have[substr(line, 1, n - 1)] = line }
        bad = 0
        for (k in want) {
            got = (k in have) ? have[k] : "(unset)"
            if (want[k] == "" && (k in have)) { print "  wanted " k " off, got " got; bad = 1 }
            if (want[k] != "" && got != want[k]) { print "  wanted " want[k] ", got " got; bad = 1 }
        }
        exit bad
    }' cfg=.config "$fragment" >&2 \
    || die "the final .config lacks options requested in $fragment (unmet dependencies?)"

step "building bzImage and vmlinux with -j$jobs"
make -j"$jobs" bzImage

cp arch/x86/boot/bzImage "$out/bzImage"
# vmlinux keeps its PT_NOTE (PVH entry point); drop only the symbol table.
objcopy --strip-all vmlinux "$out/vmlinux"
# The same kernel with its symbol table, for gdb (`pyvmm guest path` prints
# vmlinux_debug=): with the DWARF of microvm.config, `bt` names each frame.
# Booting either file is the same; pyvmm boots the smaller one.
cp vmlinux "$out/vmlinux.debug"
cp .config "$out/config"
# Symbols for the stripped vmlinux: to name a guest RIP when debugging.
cp System.map "$out/System.map"
size() { ls -l "$out/$1" | awk '{print $5}'; }
step "done: $(size bzImage) byte bzImage, $(size vmlinux) byte vmlinux, $(size vmlinux.debug) byte vmlinux.debug in $out"

#!/usr/bin/env bash
# Debian 12's own generic kernel (the bzImage of the package linux-image-amd64
# depends on, XZ-compressed), for the tests and benchmarks of host-side bzImage
# decompression (issue 17).  Prints the path of the kernel on stdout:
#
#     ${PYVMM_CACHE:-~/.cache/pyvmm}/debian-kernel/<package version>/vmlinuz
#
# beside it `info` (package, version, kernel release, size, sha256, compression).
# Cached: when the version apt knows of (`apt-cache depends linux-image-amd64`,
# from the local package lists, no network) is in the cache, nothing is
# downloaded; without package lists, or when the download fails, the newest
# cached version is used.  Otherwise `apt-get download` fetches the image
# package (~70 MB, a second or two from Debian's mirror) and only its
# /boot/vmlinuz-* is extracted (dpkg-deb --fsys-tarfile: the modules are not
# unpacked).  The payload must be XZ (checked in the bzImage's header:
# payload_offset at 0x248, the setup at (setup_sects + 1) * 512).
set -euo pipefail

cache="${PYVMM_CACHE:-$HOME/.cache/pyvmm}/debian-kernel"
say() { printf 'fetch-debian-kernel: %s\n' "$*" >&2; }

newest_cached() {
    local d
    for d in $(ls -1 "$cache" 2>/dev/null | sort -V -r); do
        [ -s "$cache/$d/vmlinuz" ] && [ -s "$cache/$d/info" ] && { echo "$cache/$d/vmlinuz"; return 0; }
    done
    return 1
}

# The image package linux-image-amd64 depends on (linux-image-6.1.0-N-amd64, the
# signed image; its -unsigned twin holds the same bzImage without the signature).
image_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\(-unsigned\)\?\)$/\1/p' | head -n1
}

pkg="$(image_package || true)"
if [ -z "$pkg" ]; then
    if found="$(newest_cached)"; then
        say "no package lists (apt-get update not run?): the cached $found"
        echo "$found"; exit 0
    fi
    if [ "$(id -u)" = 0 ]; then
        say "apt-get update (no package lists)"
        apt-get update -qq >&2
        pkg="$(image_package || true)"
    fi
    [ -n "$pkg" ] || { say "cannot tell which package linux-image-amd64 depends on"; exit 1; }
fi
version="$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)"
[ -n "$version" ] || { say "no version for $pkg"; exit 1; }
out="$cache/$version"
if [ -s "$out/vmlinuz" ] && [ -s "$out/info" ]; then
    echo "$out/vmlinuz"; exit 0
fi

mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.fetch-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
download() { (cd "$tmp" && apt-get download -q "$pkg=$version" >"$tmp/apt.log" 2>&1); }
say "apt-get download $pkg=$version"
if ! download && [ "$(id -u)" = 0 ]; then
    # Stale package lists name a version the mirror no longer has: update, ask again.
    say "download failed: apt-get update, then again"
    apt-get update -qq >&2 || true
    pkg="$(image_package || true)"
    version="$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)"
    out="$cache/$version"
    if [ -s "$out/vmlinuz" ] && [ -s "$out/info" ]; then echo "$out/vmlinuz"; exit 0; fi
    download || true
fi
if [ ! -s "$(ls "$tmp"/*.deb 2>/dev/null | head -n1)" ]; then
    cat "$tmp/apt.log" >&2
    if found="$(newest_cached)"; then
        say "download failed: the cached $found instead"
        echo "$found"; exit 0
    fi
    say "download failed and nothing cached"; exit 1
fi
deb="$(ls "$tmp"/*.deb)"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*'
kernel="$(ls "$tmp"/boot/vmlinuz-*)"
release="${kernel##*/vmlinuz-}"

# The payload's compression, from the bzImage header.
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
setup_sects="$(u8 "$kernel" $((0x1f1)))"; [ "$setup_sects" = 0 ] && setup_sects=4
payload="$(( (setup_sects + 1) * 512 + $(u32 "$kernel" $((0x248))) ))"
magic="$(od -An -tx1 -j "$payload" -N6 "$kernel" | tr -d ' \n')"
case "$magic" in
    fd377a585a00) compression=xz ;;
    *) say "$kernel: payload magic $magic is not XZ"; exit 1 ;;
esac
size="$(stat -c %s "$kernel")"
sha="$(sha256sum "$kernel" | cut -d' ' -f1)"

mkdir -p "$tmp/out"
mv "$kernel" "$tmp/out/vmlinuz"
cat >"$tmp/out/info" <<EOF
package=$pkg
version=$version
release=$release
size=$size
sha256=$sha
compression=$compression
payload_length=$(u32 "$tmp/out/vmlinuz" $((0x24c)))
EOF
rm -rf "$out"
mv "$tmp/out" "$out"
say "$pkg $version: vmlinuz-$release, $size bytes, $compression payload -> $out/vmlinuz"
echo "$out/vmlinuz"

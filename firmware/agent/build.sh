#!/bin/sh
# Build pyvmm-agent, the guest agent, as one static binary against musl.
# usage: firmware/agent/build.sh OUTFILE
#
# Why musl (Debian's musl-tools): a small, fully static binary that runs on any
# guest root filesystem, without the NSS and dlopen surprises of static glibc.
set -eu
if [ $# -ne 1 ]; then
    echo "usage: $0 OUTFILE" >&2
    exit 2
fi
out=$1
here=$(cd "$(dirname "$0")" && pwd)
cc=${MUSL_GCC:-musl-gcc}
if ! command -v "$cc" >/dev/null 2>&1; then
    echo "build.sh: $cc not found: install it with 'apt-get install musl-tools'" >&2
    exit 1
fi
# The build id names the sources, so the host can tell which agent answers.
build_id=$(cat "$here"/*.[ch] | sha256sum | cut -c1-12)
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
"$cc" -static -Os -std=gnu11 -Wall -Wextra -Werror \
    -DPYVMM_AGENT_BUILD_ID="\"$build_id\"" \
    -o "$tmp" "$here"/agent.c "$here"/main.c
strip "$tmp"
mv "$tmp" "$out"

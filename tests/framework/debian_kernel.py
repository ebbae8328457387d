"""Debian 12's own generic kernel (linux-image-amd64's bzImage, XZ-compressed), cached.

firmware/fetch-debian-kernel.sh fetches it (`apt-get download` of the image
package, only /boot/vmlinuz-* extracted) into
`${PYVMM_CACHE:-~/.cache/pyvmm}/debian-kernel/<package version>/`, with an
`info` file beside it; scripts/setup runs it, so CI has it.  find() only looks
in the cache (no network, no apt); ensure() runs the script when needed, and
the script downloads nothing when the version apt knows of is cached.

The tests of host-side decompression (issue 17) and `python -m benches boot`
boot it: it is the distribution kernel whose in-guest XZ decompression takes
many minutes on KVM PVM hosts.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "firmware" / "fetch-debian-kernel.sh"


@dataclass(frozen=True)
class DebianKernel:
    path: Path                  # .../debian-kernel/<version>/vmlinuz
    info: dict[str, str]        # package, version, release, size, sha256, compression

    @property
    def version(self) -> str:
        return self.info.get("version", self.path.parent.name)

    @property
    def release(self) -> str:
        return self.info.get("release", "?")

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def describe(self) -> str:
        return (f"Debian {self.info.get('package', 'linux-image')} {self.version} "
                f"({self.release}): {self.size / 2**20:.1f} MiB bzImage, "
                f"{payload_compression(self.path)} payload")


def cache_dir() -> Path:
    root = os.environ.get("PYVMM_CACHE") or str(Path.home() / ".cache" / "pyvmm")
    return Path(root) / "debian-kernel"


def _load(path: Path) -> DebianKernel | None:
    info_file = path.parent / "info"
    if not (path.is_file() and info_file.is_file()):
        return None
    info = dict(line.split("=", 1) for line in info_file.read_text().splitlines() if "=" in line)
    return DebianKernel(path, info)


def _version_key(name: str) -> list:
    import re
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def find() -> DebianKernel | None:
    """The newest cached Debian kernel, or None; looks only in the cache."""
    try:
        names = sorted((d.name for d in cache_dir().iterdir() if not d.name.startswith(".")),
                       key=_version_key, reverse=True)
    except OSError:
        return None
    for name in names:
        found = _load(cache_dir() / name / "vmlinuz")
        if found is not None:
            return found
    return None


def ensure(timeout: float = 600) -> DebianKernel:
    """The kernel, fetched with firmware/fetch-debian-kernel.sh unless the version apt
    knows of is cached (then nothing is downloaded).  RuntimeError, with the script's
    output, when it cannot be had (no network and nothing cached)."""
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                          timeout=timeout)
    path = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
    found = _load(Path(path[0])) if path else None
    if found is None:
        raise RuntimeError(f"{SCRIPT.name} failed (status {proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return found


def payload_compression(path: Path) -> str:
    """The compression of a bzImage's payload, as pyvmm's loader names it (or why none)."""
    from pyvmm.boot.bzimage import parse_bzimage
    from pyvmm.boot.errors import BootError
    from pyvmm.boot.payload import payload_of
    data = path.read_bytes()
    try:
        return payload_of(parse_bzimage(data, str(path)), data).compression
    except BootError as exc:
        return f"unknown ({exc})"


if __name__ == "__main__":
    print(ensure().describe())

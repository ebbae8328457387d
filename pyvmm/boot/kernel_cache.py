"""Decompressed kernels, cached by the hash of the bzImage they came from.

The second boot of the same bzImage reads its vmlinux from here instead of
decompressing it again.  Files are `<sha256 of the bzImage>.vmlinux` in
${PYVMM_KERNEL_CACHE:-$PYVMM_CACHE/decompressed} (PYVMM_KERNEL_CACHE=off turns
the cache off), written under a temporary name and renamed, so a reader never
sees half a file.  The directory is bounded (PYVMM_KERNEL_CACHE_MAX_MB, default
1024): the least recently used kernels go first.  A cache that cannot be used
(a read-only or missing directory, as inside `pyvmm jail`) only costs the
decompression: it is never an error.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyvmm.builtin_guest import cache_root
from pyvmm.host_files import HostFileError, read_regular_file

ENV_DIRECTORY = "PYVMM_KERNEL_CACHE"
ENV_MAX_MB = "PYVMM_KERNEL_CACHE_MAX_MB"
DEFAULT_MAX_BYTES = 1 << 30
SUFFIX = ".vmlinux"
MiB = 1 << 20


def bzimage_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class KernelCache:
    directory: Path
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_environment(cls) -> "KernelCache | None":
        """The cache the environment asks for, or None where it is turned off."""
        where = os.environ.get(ENV_DIRECTORY, "")
        if where.lower() == "off":
            return None
        try:
            directory = Path(where) if where else cache_root() / "decompressed"
        except (RuntimeError, KeyError):     # no $HOME and no passwd entry: in `pyvmm jail`
            return None
        try:
            max_bytes = int(os.environ.get(ENV_MAX_MB, "")) * MiB
        except ValueError:
            max_bytes = DEFAULT_MAX_BYTES
        return cls(directory, max(0, max_bytes))

    def path(self, key: str) -> Path:
        return self.directory / (key + SUFFIX)

    def get(self, key: str, limit: int) -> bytes | None:
        """The kernel cached under key, or None; a hit counts as a use for eviction."""
        path = self.path(key)
        try:
            data = read_regular_file(path, "cached kernel", limit)
            os.utime(path)
        except (HostFileError, OSError):
            return None
        return data

    def drop(self, key: str) -> None:
        try:
            self.path(key).unlink()
        except OSError:
            pass

    def put(self, key: str, data: bytes) -> str | None:
        """Cache data under key; None, or why it was not cached."""
        if len(data) > self.max_bytes:
            return f"larger than the cache's {self.max_bytes >> 20} MiB"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, self.path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            return f"cannot write {self.directory}: {exc.strerror or exc}"
        self.evict(keep=key)
        return None

    def evict(self, keep: str | None = None) -> None:
        """Remove the least recently used kernels until the cache fits its bound."""
        entries = []
        try:
            for entry in os.scandir(self.directory):
                if entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    entries.append((st.st_mtime, st.st_size, entry.path, entry.name))
        except OSError:
            return
        total = sum(size for _, size, _, _ in entries)
        for _, size, path, name in sorted(entries):
            if total <= self.max_bytes:
                break
            if name == (keep or "") + SUFFIX:
                continue
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass

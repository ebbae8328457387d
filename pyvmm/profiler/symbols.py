"""Kernel symbols from System.map (`nm -n vmlinux` format: ADDRESS TYPE NAME).

Used to name sampled RIPs, to tell the kernel's own text from everything else (the
bzImage decompressor runs at identity-mapped physical addresses, far below the
kernel's link addresses), and to find initcall functions (the `__initcall__kmod_*`
data symbols of Linux 5.15+, `__initcall_*` before).
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.profiler.fileformat import ProfileError, read_regular_file

TEXT_TYPES = frozenset("tTwW")
MAX_LINE = 4096
MAX_LINES = 5_000_000
MAX_MAP_BYTES = 256 << 20        # Linux's own System.map is a few MiB
# Level suffixes of initcall symbols (include/linux/init.h), longest first so that
# "1s" is tried before "1".
INITCALL_LEVELS = ("sysctlsearly", "sysctls", "rootfs", "early", "con", "0s", "1s", "2s",
                   "3s", "4s", "5s", "6s", "7s", "0", "1", "2", "3", "4", "5", "6", "7")
INITCALL_KMOD = re.compile(r"__initcall__kmod_.+?__\d+_\d+_(.+)")
INITCALL_OLD = re.compile(r"__initcall_(.+)")
# Entered for every initcall: the initcalls phase starts with it or an initcall.
INITCALL_DRIVERS = frozenset({"do_one_initcall", "do_initcalls", "do_initcall_level",
                              "do_pre_smp_initcalls"})
LINE = re.compile(r"([0-9a-fA-F]{1,16})\s+([A-Za-z?])\s+(\S+)")


@dataclass
class Symbols:
    """Text symbols sorted by address; lookup() names an address."""
    addresses: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    is_text: list[bool] = field(default_factory=list)
    kernel_start: int = 0
    kernel_end: int = 0
    initcalls: frozenset[str] = frozenset()

    @classmethod
    def from_system_map(cls, path: str | Path) -> "Symbols":
        return cls.parse(read_regular_file(path, MAX_MAP_BYTES), str(path))

    @classmethod
    def parse(cls, data: bytes, source: str = "<System.map>") -> "Symbols":
        """From the bytes of a System.map; ProfileError (one line) if they are not one."""
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ProfileError(f"{source}: not a System.map (it is not ASCII text)") from None
        entries: list[tuple[int, bool, str]] = []
        initcall_symbols: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            if number > MAX_LINES:
                raise ProfileError(f"{source}: more than {MAX_LINES} lines: not a System.map")
            if not line.strip():
                continue
            match = LINE.fullmatch(line.strip()) if len(line) <= MAX_LINE else None
            if match is None:
                raise ProfileError(f"{source}: line {number}: expected 'ADDRESS TYPE NAME' "
                                   f"(a System.map line), got {line[:60]!r}")
            address, kind, name = int(match.group(1), 16), match.group(2), match.group(3)
            entries.append((address, kind in TEXT_TYPES, name))
            if name.startswith("__initcall_"):
                initcall_symbols.append(name)
        if not any(is_text for _, is_text, _ in entries):
            raise ProfileError(f"{source}: no text (function) symbols: not a System.map")
        entries.sort(key=lambda e: e[0])
        by_name = {name: address for address, _, name in entries}
        text_names = {name for _, is_text, name in entries if is_text}
        start = by_name.get("_text", min(a for a, t, _ in entries if t))
        end = by_name.get("_end", entries[-1][0] + 1)
        return cls(addresses=[e[0] for e in entries], names=[e[2] for e in entries],
                   is_text=[e[1] for e in entries], kernel_start=start,
                   kernel_end=max(end, start + 1),
                   initcalls=frozenset(initcall_functions(initcall_symbols, text_names)))

    def in_kernel(self, address: int) -> bool:
        return self.kernel_start <= address < self.kernel_end

    def lookup(self, address: int) -> str | None:
        """The function holding address, or None outside the kernel image.  An address
        in the image but not in a function (data, padding) names the symbol before it
        in brackets."""
        if not self.in_kernel(address):
            return None
        i = bisect.bisect_right(self.addresses, address) - 1
        if i < 0:
            return None
        return self.names[i] if self.is_text[i] else f"[{self.names[i]}]"

    def is_initcall(self, function: str) -> bool:
        return function in self.initcalls or function in INITCALL_DRIVERS


def initcall_function(symbol: str, functions: set[str]) -> str | None:
    """The function an initcall symbol points at: `__initcall__kmod_core__295_2229_
    init_hw_perf_eventsearly` -> init_hw_perf_events.  The level suffix is glued to
    the name, so a candidate counts only if it is a text symbol of the map."""
    match = INITCALL_KMOD.fullmatch(symbol) or INITCALL_OLD.fullmatch(symbol)
    if match is None:
        return None
    rest = match.group(1)
    for level in INITCALL_LEVELS:
        if rest.endswith(level) and rest[:-len(level)] in functions:
            return rest[:-len(level)]
    return None


def initcall_functions(symbols: list[str], functions: set[str]) -> set[str]:
    found = (initcall_function(s, functions) for s in symbols)
    return {name for name in found if name}

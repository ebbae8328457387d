"""The kernel command line, built from the configuration and the host facts.

build_cmdline() is a pure function: the VM builder, the benchmarks and the
tests all call it, and nobody builds a VM just to learn the string.  The
line is validated as it grows, as rust-vmm linux-loader's `Cmdline` does:
no NUL or control bytes, a length limit, and no parameter given twice with
two different values (a `root=` in boot_args and a root drive, say), where
the kernel would silently take one of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from pyvmm.errors import PyvmmError
from pyvmm.layout import CMDLINE_MAX_SIZE, MAX_VIRTIO_DEVICES, virtio_window

if TYPE_CHECKING:
    from pyvmm.config import VmSpec

# Parameters the kernel takes more than once, each occurrence adding to the
# others rather than replacing them.
REPEATABLE = frozenset({"virtio_mmio.device", "console"})


class CmdlineError(PyvmmError):
    """The kernel command line would be invalid."""


def _key(param: str) -> str:
    return param.split("=", 1)[0]


def split_params(text: str) -> list[str]:
    """Parameters separated by spaces, a double-quoted value kept whole
    (`dyndbg="file foo.c +p"`), as the kernel's parse_args() splits them."""
    params, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char in " \t\n" and not quoted:
            if current:
                params.append("".join(current))
                current = []
            continue
        current.append(char)
    if quoted:
        raise CmdlineError(f"the kernel command line has an unterminated quote: {text!r}")
    if current:
        params.append("".join(current))
    return params


class Cmdline:
    """A kernel command line that stays valid as parameters are added."""

    def __init__(self, capacity: int = CMDLINE_MAX_SIZE) -> None:
        self.capacity = capacity              # bytes, the terminating NUL included
        self.params: list[str] = []
        self._values: dict[str, str] = {}     # key -> the whole param, non-repeatable keys

    def add(self, param: str) -> None:
        """One parameter, `key=value` or a flag.  The same parameter again is a
        no-op; the same key with another value is an error."""
        if not param or any(c in param for c in " \t\n") and '"' not in param:
            raise CmdlineError(f"kernel parameter {param!r} is empty or contains a space")
        if any(ord(c) < 0x20 or c == "\x7f" for c in param if c not in " \t"):
            raise CmdlineError(f"kernel parameter {param!r} contains a NUL or control "
                               "character")
        key = _key(param)
        if key not in REPEATABLE:
            seen = self._values.get(key)
            if seen == param:
                return
            if seen is not None:
                raise CmdlineError(f"the kernel command line would set {key} twice, as {seen} "
                                   f"and as {param}: remove one")
            self._values[key] = param
        self.params.append(param)
        if len(str(self)) + 1 > self.capacity:
            self.params.pop()
            raise CmdlineError(f"the kernel command line would be longer than "
                               f"{self.capacity - 1} bytes")

    def extend(self, params: Iterable[str]) -> None:
        for param in params:
            self.add(param)

    def add_text(self, text: str) -> None:
        """Parameters as a user wrote them (boot_args).  Within the user's own text
        a key may repeat (the kernel takes the last), but not one we also set."""
        if "\0" in text:
            raise CmdlineError("the kernel command line contains a NUL byte")
        ours = dict(self._values)
        for param in split_params(text):
            seen = ours.get(_key(param))
            if seen is not None and seen != param:
                raise CmdlineError(f"boot_args sets {param}, but pyvmm already sets {seen} "
                                   "from the configuration: remove it from boot_args")
            self._values.pop(_key(param), None)     # the user's own repeats are theirs
            self.add(param)

    def __str__(self) -> str:
        return " ".join(self.params)


def build_cmdline(spec: "VmSpec", pvm: bool,
                  mmio_windows: Iterable[tuple[int, int]] | None = None) -> str:
    """The final kernel command line of a VM built from spec.

    In order: the KVM PVM parameters (on PVM hosts), one virtio_mmio.device per
    virtio device with its window and IRQ, root= for a root drive, then the
    user's boot_args (or the default command line).  mmio_windows are the
    devices' (base, irq); by default pyvmm.layout's, in spec.virtio_devices()
    order, which is where the builder puts them.
    """
    from pyvmm import pvm as pvm_host
    devices = spec.virtio_devices()
    if mmio_windows is None:
        if len(devices) > MAX_VIRTIO_DEVICES:
            raise CmdlineError(f"{len(devices)} virtio devices is too many: at most "
                               f"{MAX_VIRTIO_DEVICES}")
        mmio_windows = [virtio_window(index) for index in range(len(devices))]
    line = Cmdline()
    if pvm:
        line.extend(split_params(pvm_host.KERNEL_PARAMS))
    for base, irq in mmio_windows:
        line.add(f"virtio_mmio.device=4K@{base:#x}:{irq}")
    root = next((d for d in spec.ordered_drives() if d.is_root_device), None)
    if root is not None:
        # Firecracker's append_root_device_cmdline: the partition by its UUID if given.
        line.extend([f"root=PARTUUID={root.partuuid}" if root.partuuid else "root=/dev/vda",
                     "ro" if root.is_read_only else "rw"])
    line.add_text(spec.kernel_args)
    return str(line)

"""Just enough of the i8042 keyboard controller for `reboot=k`.

Linux resets the machine by writing command 0xFE (pulse the reset line) to
port 0x64; we end the VM there.  Reads say "no data, input buffer empty", so
the kernel's waits for the controller finish at once.
"""
from __future__ import annotations

from pyvmm.machine import StopVcpu

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_PORTS = 5                       # 0x60..0x64
CMD_RESET_CPU = 0xFE
STATUS_SYSTEM_FLAG = 0x04             # "passed self-test"


class I8042:
    def __init__(self) -> None:
        self.reset_requested = False

    def read(self, offset: int, size: int) -> bytes:
        value = STATUS_SYSTEM_FLAG if offset == I8042_COMMAND_PORT - I8042_DATA_PORT else 0
        return bytes([value]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if offset == I8042_COMMAND_PORT - I8042_DATA_PORT and data[0] == CMD_RESET_CPU:
            self.reset_requested = True
            raise StopVcpu()

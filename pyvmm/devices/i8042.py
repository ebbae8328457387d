"""The i8042 keyboard controller with a PS/2 keyboard behind it.

Two jobs: `reboot=k` (Linux pulses the CPU reset line with command 0xFE on
port 0x64 and we end the VM), and SendCtrlAltDel (the host types
Ctrl-Alt-Del, Linux's keyboard driver sees it and restarts or signals init).

The model follows the controller as Linux's i8042 and atkbd drivers use it:
a control register (CTR), an output buffer that the keyboard and the
controller's own command replies share, IRQ 1 while the buffer is full and
the keyboard interrupt is enabled, and a keyboard that acknowledges its
commands.  Translation is off in the CTR, so Linux drives the keyboard in
scancode set 2 directly (i8042.c: "If the chip is configured into
nontranslated mode by the BIOS, don't bother enabling translating") and we
send set-2 codes.  There is no mouse (AUX) port: boot with i8042.noaux.
Command numbers: the IBM PC/AT technical reference, as in Linux's
drivers/input/serio/i8042.h and libps2.h.
"""
from __future__ import annotations

import collections
import threading

from pyvmm.devices.virtio.state import StateError, StateReader
from typing import Callable

from pyvmm.errors import PyvmmError
from pyvmm.machine import StopVcpu

from pyvmm.layout import I8042_COMMAND_PORT, I8042_DATA_PORT

I8042_PORTS = 5                       # 0x60..0x64 (0x61 is the PIT's, handled in KVM)
DATA, COMMAND = 0, I8042_COMMAND_PORT - I8042_DATA_PORT

# Status register (read from 0x64)
STR_OBF = 0x01                        # output buffer full: a byte waits at 0x60
STR_SYSFLAG = 0x04                    # self-test passed
STR_CMDDAT = 0x08                     # the last write was to 0x64
STR_KEYLOCK = 0x10                    # 1: keyboard not inhibited

# Control register bits (CTR)
CTR_KBDINT = 0x01                     # IRQ 1 when the keyboard's output buffer fills
CTR_SYSFLAG = 0x04
CTR_KBDDIS = 0x10                     # keyboard clock off: nothing comes from it
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40                      # set-1 translation (we leave it off)
CTR_DEFAULT = CTR_KBDINT | CTR_SYSFLAG | CTR_AUXDIS

# Controller commands (written to 0x64)
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_SELF_TEST = 0xAA                  # replies 0x55
CMD_KBD_TEST = 0xAB                   # replies 0x00: the keyboard port is fine
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_OUTPUT = 0xD2           # the next data byte comes back as if the keyboard sent it
CMD_RESET_CPU = 0xFE
SELF_TEST_OK = 0x55
OUTPUT_PORT_RESET = 0x01              # output port bit 0 low holds the CPU in reset
OUTPUT_PORT_DEFAULT = 0x03            # not in reset, A20 on

# Keyboard commands (written to 0x60) and replies
KBD_SET_LEDS = 0xED
KBD_ECHO = 0xEE
KBD_SCANCODE_SET = 0xF0
KBD_GET_ID = 0xF2
KBD_SET_RATE = 0xF3
KBD_ENABLE = 0xF4
KBD_RESET_DISABLE = 0xF5
KBD_RESET = 0xFF
KBD_ACK = 0xFA
KBD_BAT_OK = 0xAA                     # basic assurance test passed, after a reset
KBD_ID = (0xAB, 0x83)                 # an MF2 keyboard
KBD_COMMANDS_WITH_ARGUMENT = (KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_SET_RATE)
SCANCODE_SET = 2

# Ctrl-Alt-Del in scancode set 2: left Ctrl, left Alt, then Delete (extended).
CTRL_ALT_DEL = bytes([0x14, 0x11, 0xE0, 0x71])
OUTPUT_QUEUE = 16                     # bytes the keyboard holds for the guest


class I8042Error(PyvmmError):
    """The guest's keyboard cannot take a key press now."""


class I8042:
    def __init__(self, set_irq_line: Callable[[int], None] | None = None) -> None:
        self._set_irq_line = set_irq_line or (lambda level: None)
        self._lock = threading.Lock()
        self.reset_requested = False
        self.ctr = CTR_DEFAULT
        self.output_port = OUTPUT_PORT_DEFAULT
        self._status = STR_SYSFLAG | STR_KEYLOCK
        self._pending_command = 0          # a 0x64 command waiting for its data byte
        self._kbd_pending_command = 0      # a keyboard command waiting for its argument
        self._kbd_enabled = True           # scanning on (KBD_ENABLE / KBD_RESET_DISABLE)
        self._queue: collections.deque[int] = collections.deque()
        self._line = 0

    # -- saved state (snapshots) --------------------------------------------------

    def save(self) -> dict:
        with self._lock:
            return {"ctr": self.ctr, "output_port": self.output_port, "status": self._status,
                    "pending_command": self._pending_command,
                    "kbd_pending_command": self._kbd_pending_command,
                    "kbd_enabled": self._kbd_enabled, "queue": list(self._queue),
                    "line": self._line}

    def restore(self, state: object) -> None:
        """Take what save() returned; StateError, with nothing applied, if unusable."""
        saved = StateReader(state, "i8042 state")
        values = [saved.number(key, 0xFF) for key in
                  ("ctr", "output_port", "status", "pending_command", "kbd_pending_command")]
        enabled, line = saved.flag("kbd_enabled"), saved.number("line", 1)
        queue = saved.record("queue")
        if type(queue) is not list or len(queue) > OUTPUT_QUEUE or \
                any(type(b) is not int or not 0 <= b <= 0xFF for b in queue):
            raise StateError(f"the saved i8042 state's queue is not a list of at most "
                             f"{OUTPUT_QUEUE} bytes")
        with self._lock:
            (self.ctr, self.output_port, self._status, self._pending_command,
             self._kbd_pending_command) = values
            self._kbd_enabled, self._line = enabled, line
            self._queue = collections.deque(queue)

    # -- host side -------------------------------------------------------------

    def press_ctrl_alt_del(self) -> None:
        """Type Ctrl-Alt-Del (key presses only, as Firecracker does)."""
        with self._lock:
            if self.ctr & CTR_KBDDIS or not self._kbd_enabled:
                raise I8042Error("the guest has not enabled its keyboard (no i8042/atkbd "
                                 "driver, or it is still starting): Ctrl-Alt-Del not sent")
            if len(self._queue) + len(CTRL_ALT_DEL) > OUTPUT_QUEUE:
                raise I8042Error("the guest is not reading its keyboard: Ctrl-Alt-Del not sent")
            self._queue.extend(CTRL_ALT_DEL)
            self._update_irq()

    # -- guest side ------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset == COMMAND:
                value = self._status | (STR_OBF if self._queue else 0)
            elif offset == DATA:
                value = self._queue.popleft() if self._queue else 0
                # One byte per interrupt: drop the line so the next byte is a new edge.
                self._drive_irq(0)
            else:
                value = 0xFF
            self._update_irq()
        return bytes([value]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if offset == COMMAND:
                self._status |= STR_CMDDAT
                reset = self._controller_command(data[0])
            elif offset == DATA:
                self._status &= ~STR_CMDDAT
                reset = self._data_byte(data[0])
            else:
                reset = False
            self._update_irq()
        if reset:
            self.reset_requested = True
            raise StopVcpu()

    def _reply(self, *values: int) -> None:
        # A command reply replaces whatever was waiting, as on the real chip
        # (and Linux flushes the buffer before each command anyway).
        self._queue.clear()
        self._queue.extend(values)

    def _controller_command(self, command: int) -> bool:
        """Handle a write to 0x64; True if it resets the CPU."""
        if command in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KBD_OUTPUT):
            self._pending_command = command
        elif command == CMD_READ_CTR:
            self._reply(self.ctr)
        elif command == CMD_READ_OUTPUT_PORT:
            self._reply(self.output_port)
        elif command == CMD_SELF_TEST:
            self._reply(SELF_TEST_OK)
        elif command == CMD_KBD_TEST:
            self._reply(0x00)
        elif command == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBDDIS
        elif command == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBDDIS
        elif command == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUXDIS
        elif command == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUXDIS
        elif command == CMD_RESET_CPU:
            return True
        elif command & 0xF0 == 0xF0:
            # Pulse output port lines: bit 0 clear in the mask pulses the reset line.
            return not command & OUTPUT_PORT_RESET
        return False

    def _data_byte(self, value: int) -> bool:
        """Handle a write to 0x60: a command's argument or a byte for the keyboard."""
        command, self._pending_command = self._pending_command, 0
        if command == CMD_WRITE_CTR:
            self.ctr = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self.output_port = value
            return not value & OUTPUT_PORT_RESET
        elif command == CMD_WRITE_KBD_OUTPUT:
            self._reply(value)
        else:
            self._keyboard_byte(value)
        return False

    def _keyboard_byte(self, value: int) -> None:
        """The PS/2 keyboard's side: every byte is acknowledged."""
        command, self._kbd_pending_command = self._kbd_pending_command, 0
        if command == KBD_SCANCODE_SET and value == 0:
            self._reply(KBD_ACK, SCANCODE_SET)   # argument 0: "which set is in use?"
        elif command:
            self._reply(KBD_ACK)                 # the argument of LEDs/rate: taken
        elif value in KBD_COMMANDS_WITH_ARGUMENT:
            self._kbd_pending_command = value
            self._reply(KBD_ACK)
        elif value == KBD_ECHO:
            self._reply(KBD_ECHO)
        elif value == KBD_GET_ID:
            self._reply(KBD_ACK, *KBD_ID)
        elif value == KBD_RESET:
            self._kbd_enabled = True
            self._reply(KBD_ACK, KBD_BAT_OK)
        else:
            if value == KBD_ENABLE:
                self._kbd_enabled = True
            elif value == KBD_RESET_DISABLE:
                self._kbd_enabled = False
            self._reply(KBD_ACK)

    def _update_irq(self) -> None:
        self._drive_irq(1 if self._queue and self.ctr & CTR_KBDINT else 0)

    def _drive_irq(self, level: int) -> None:
        if level != self._line:
            self._line = level
            self._set_irq_line(level)

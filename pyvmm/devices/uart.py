"""The guest's serial port: an 8250/16550A UART model (the PC's COM1).

The host side of the console (capture, stdin) is pyvmm.console.

Enough of the chip for Linux's 8250 driver with interrupts: the divisor latch,
IER/IIR with THRE and received-data interrupts, a receive FIFO fed by the host
(stdin or a test), LSR/MSR that say "ready".  Register layout from the
PC16550D datasheet.  The interrupt line follows QEMU's model: the line level
is "an interrupt is pending", and KVM's PIC/IOAPIC turn rising edges into
interrupts.
"""
from __future__ import annotations

import collections
import threading

from pyvmm.devices.virtio.state import StateReader, encode_bytes
from typing import Callable

UART_REGISTERS = 8              # where they sit: pyvmm.layout.COM1_PORT, COM1_IRQ

# Register offsets (DLAB=0 unless noted).
RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDA, IER_THRE = 0x1, 0x2
IIR_NONE, IIR_THRE, IIR_RDA = 0x1, 0x2, 0x4
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX = 0x1, 0x2
LCR_DLAB = 0x80
MCR_LOOP, MCR_OUT2 = 0x10, 0x08
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_DCD = 0x10, 0x20, 0x80
RX_FIFO_LIMIT = 64 * 1024      # host input waiting for the guest; beyond it, input is dropped


class Uart:
    """The 16550A; `output` gets every byte the guest transmits."""

    def __init__(self, output: Callable[[bytes], None],
                 raise_irq: Callable[[int], None] | None = None) -> None:
        self.output = output
        self._set_irq_line = raise_irq or (lambda level: None)
        self._lock = threading.Lock()
        self.rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.divisor = 12                 # 9600 baud; Linux reprograms it
        self.thre_pending = False         # THRE interrupt latched until IIR is read
        self._line = 0
        self.tx_bytes = 0

    # -- saved state (snapshots) --------------------------------------------------

    REGISTERS = ("ier", "lcr", "mcr", "scr", "fcr", "divisor")

    def save(self) -> dict:
        with self._lock:
            state = {name: getattr(self, name) for name in self.REGISTERS}
            state.update(thre_pending=self.thre_pending, line=self._line,
                         rx=encode_bytes(bytes(self.rx)))
            return state

    def restore(self, state: object) -> None:
        """Take what save() returned; StateError, with nothing applied, if unusable.
        The interrupt line is not driven: the restored irqchip already holds its level."""
        saved = StateReader(state, "serial port state")
        values = {name: saved.number(name, 0xFFFF if name == "divisor" else 0xFF)
                  for name in self.REGISTERS}
        thre, line = saved.flag("thre_pending"), saved.number("line", 1)
        rx = saved.blob("rx", RX_FIFO_LIMIT)
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)
            self.thre_pending, self._line = thre, line
            self.rx = collections.deque(rx)

    # -- host side -------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes typed by the host, for the guest to read."""
        with self._lock:
            room = RX_FIFO_LIMIT - len(self.rx)
            self.rx.extend(data[:max(0, room)])
            self._update_irq()

    # -- guest side ------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read_register(offset)
            self._update_irq()
        return bytes([value]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._write_register(offset, data[0])
            self._update_irq()

    def _read_register(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                return self.divisor & 0xFF
            return self.rx.popleft() if self.rx else 0
        if offset == IER:
            return (self.divisor >> 8) if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._interrupt_id()
            if iir == IIR_THRE:
                self.thre_pending = False    # reading IIR acknowledges THRE
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if offset == MSR:
            if self.mcr & MCR_LOOP:          # loopback: outputs read back as inputs
                return ((self.mcr & 0x3) << 4) | ((self.mcr & 0xC) << 4)
            return MSR_CTS | MSR_DSR | MSR_DCD
        return self.scr

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
                return
            self.tx_bytes += 1
            if not self.mcr & MCR_LOOP:
                self.output(bytes([value]))
            self.thre_pending = True         # the byte left at once: THR is empty again
        elif offset == IER:
            if dlab:
                self.divisor = (self.divisor & 0xFF) | (value << 8)
                return
            # Enabling THRE with an empty THR raises the interrupt at once.
            if value & IER_THRE and not self.ier & IER_THRE:
                self.thre_pending = True
            self.ier = value & 0x0F
        elif offset == IIR_FCR:
            self.fcr = value
            if value & FCR_CLEAR_RX:
                self.rx.clear()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value

    def _interrupt_id(self) -> int:
        if self.ier & IER_RDA and self.rx:
            return IIR_RDA
        if self.ier & IER_THRE and self.thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _update_irq(self) -> None:
        level = 0 if self._interrupt_id() == IIR_NONE else 1
        if level != self._line:
            self._line = level
            self._set_irq_line(level)

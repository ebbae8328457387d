"""The i8042 model, driven the way Linux's i8042/atkbd drivers drive it, and
by hypothesis with arbitrary port traffic.  The Linux guest's side of
Ctrl-Alt-Del is checked in test_api_vm.py (SendCtrlAltDel ends the VM)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from pyvmm.devices import i8042 as kbc
from pyvmm.devices.i8042 import I8042, I8042Error
from pyvmm.machine import StopVcpu

DATA, COMMAND = 0, 4


class Wire:
    """IRQ 1 as the in-kernel irqchip sees it: levels and rising edges."""

    def __init__(self) -> None:
        self.level = 0
        self.edges = 0

    def __call__(self, level: int) -> None:
        assert level != self.level, "the model drove the line to the level it already had"
        self.edges += level > self.level
        self.level = level


def status(dev: I8042) -> int:
    return dev.read(COMMAND, 1)[0]


def command(dev: I8042, cmd: int, *args: int) -> None:
    dev.write(COMMAND, bytes([cmd]))
    for arg in args:
        dev.write(DATA, bytes([arg]))


def drain(dev: I8042) -> list[int]:
    out = []
    while status(dev) & kbc.STR_OBF:
        out.append(dev.read(DATA, 1)[0])
    return out


@pytest.fixture
def wire():
    return Wire()


@pytest.fixture
def dev(wire):
    return I8042(wire)


def test_linux_probe_sequence(dev):
    # i8042_controller_check/init: flush, read the CTR, write it back with the
    # keyboard disabled, then enable the keyboard port with its interrupt.
    assert drain(dev) == []
    command(dev, kbc.CMD_READ_CTR)
    ctr = drain(dev)[0]
    assert ctr & kbc.CTR_XLATE == 0, "translation on: Linux would expect set-1 codes"
    command(dev, kbc.CMD_WRITE_CTR, (ctr | kbc.CTR_KBDDIS) & ~kbc.CTR_KBDINT)
    command(dev, kbc.CMD_READ_CTR)
    assert drain(dev) == [(ctr | kbc.CTR_KBDDIS) & ~kbc.CTR_KBDINT]
    command(dev, kbc.CMD_SELF_TEST)
    assert drain(dev) == [kbc.SELF_TEST_OK]
    command(dev, kbc.CMD_WRITE_CTR, ctr & ~kbc.CTR_KBDDIS | kbc.CTR_KBDINT)
    assert status(dev) & (kbc.STR_SYSFLAG | kbc.STR_KEYLOCK) == kbc.STR_SYSFLAG | kbc.STR_KEYLOCK


def test_keyboard_commands_are_acknowledged_like_an_mf2_keyboard(dev):
    dev.write(DATA, bytes([kbc.KBD_RESET]))
    assert drain(dev) == [kbc.KBD_ACK, kbc.KBD_BAT_OK]
    dev.write(DATA, bytes([kbc.KBD_GET_ID]))
    assert drain(dev) == [kbc.KBD_ACK, 0xAB, 0x83]
    dev.write(DATA, bytes([kbc.KBD_SCANCODE_SET]))
    assert drain(dev) == [kbc.KBD_ACK]
    dev.write(DATA, bytes([0]))                       # "which set?"
    assert drain(dev) == [kbc.KBD_ACK, 2]
    dev.write(DATA, bytes([kbc.KBD_SET_LEDS]))
    dev.write(DATA, bytes([0x07]))
    assert drain(dev) == [kbc.KBD_ACK]                 # the LED byte's ack replaces the first
    dev.write(DATA, bytes([kbc.KBD_ECHO]))
    assert drain(dev) == [kbc.KBD_ECHO]


def test_ctrl_alt_del_arrives_as_set2_codes_one_interrupt_per_byte(dev, wire):
    dev.press_ctrl_alt_del()
    got = []
    while wire.level:
        got.append(dev.read(DATA, 1)[0])             # what Linux's IRQ 1 handler does
    assert bytes(got) == bytes([0x14, 0x11, 0xE0, 0x71])
    assert wire.edges == 4 and status(dev) & kbc.STR_OBF == 0


def test_no_interrupt_while_the_guest_masks_it(dev, wire):
    command(dev, kbc.CMD_WRITE_CTR, kbc.CTR_DEFAULT & ~kbc.CTR_KBDINT)
    dev.press_ctrl_alt_del()
    assert wire.edges == 0 and status(dev) & kbc.STR_OBF     # pollable, no IRQ
    command(dev, kbc.CMD_WRITE_CTR, kbc.CTR_DEFAULT)         # unmasked: the bytes still wait
    assert wire.level == 1 and wire.edges == 1


def test_ctrl_alt_del_refused_when_the_keyboard_is_off_or_not_read(dev):
    command(dev, kbc.CMD_KBD_DISABLE)
    with pytest.raises(I8042Error, match="not enabled its keyboard"):
        dev.press_ctrl_alt_del()
    command(dev, kbc.CMD_KBD_ENABLE)
    for _ in range(kbc.OUTPUT_QUEUE // len(kbc.CTRL_ALT_DEL)):
        dev.press_ctrl_alt_del()
    with pytest.raises(I8042Error, match="not reading its keyboard"):
        dev.press_ctrl_alt_del()


@pytest.mark.parametrize("cmd, data", [(kbc.CMD_RESET_CPU, None), (0xF0, None),
                                       (kbc.CMD_WRITE_OUTPUT_PORT, 0x02)])
def test_each_way_of_pulsing_the_reset_line_stops_the_vcpu(dev, cmd, data):
    with pytest.raises(StopVcpu):
        command(dev, cmd, *([] if data is None else [data]))
    assert dev.reset_requested


def test_writing_the_output_port_without_the_reset_bit_clear_does_not_reset(dev):
    command(dev, kbc.CMD_WRITE_OUTPUT_PORT, 0x03)
    command(dev, kbc.CMD_READ_OUTPUT_PORT)
    assert drain(dev) == [0x03] and not dev.reset_requested


accesses = st.lists(st.tuples(st.sampled_from(["read", "write", "press"]),
                              st.integers(0, 4), st.integers(0, 255), st.sampled_from([1, 2, 4])),
                    max_size=200)


@settings(max_examples=300, deadline=None)
@given(accesses)
def test_arbitrary_port_traffic_keeps_the_model_consistent(ops):
    wire = Wire()
    dev = I8042(wire)
    for op, offset, value, size in ops:
        try:
            if op == "read":
                assert len(dev.read(offset, size)) == size
            elif op == "write":
                dev.write(offset, bytes([value]) + bytes(size - 1))
            else:
                dev.press_ctrl_alt_del()
        except StopVcpu:
            assert dev.reset_requested
        except I8042Error:
            pass
        queued = len(dev._queue)
        assert queued <= kbc.OUTPUT_QUEUE
        assert bool(status(dev) & kbc.STR_OBF) == (queued > 0)
        assert wire.level == int(queued > 0 and bool(dev.ctr & kbc.CTR_KBDINT))

"""gdb's remote serial protocol: packet framing, checksums, escaping, run-length.

gdb/doc "Overview" of the Remote Protocol: a packet is `$data#cs`, cs the modulo-256
sum of data's bytes in two hex digits; the receiver acks with `+` or asks again
with `-`.  In data `}` escapes the next byte (XOR 0x20) and `X*n` repeats X n-29
times.  A lone 0x03 outside a packet is Ctrl-C.

Everything received is bounded: a packet longer than MAX_PACKET (what we announce
in qSupported) is dropped and answered with `-` like a bad checksum, and a
run-length that would grow it past the bound is refused, so a hostile peer can
make us neither allocate nor loop without limit.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

# What qSupported announces as PacketSize (bytes of data, without the framing).
MAX_PACKET = 0x4000
INTERRUPT = 0x03
ESCAPE, RLE, START, END = 0x7D, 0x2A, 0x24, 0x23
# The bytes that must be escaped in binary data (gdb/doc: "Binary Data").
MUST_ESCAPE = frozenset((START, END, ESCAPE, RLE))
RLE_BIAS = 29          # "X*n" repeats X (n - 29) more times


class ProtocolError(ValueError):
    """A malformed packet body (bad hex, missing fields...)."""


class Kind(enum.Enum):
    PACKET = "packet"
    ACK = "ack"
    NACK = "nack"
    INTERRUPT = "interrupt"
    BAD = "bad"            # checksum mismatch, too long, bad run-length: answer '-'


@dataclass(frozen=True)
class Event:
    kind: Kind
    data: bytes = b""


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in MUST_ESCAPE:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def frame(data: bytes) -> bytes:
    """A packet ready to send; data must already be escaped where needed."""
    return b"$" + data + b"#" + f"{checksum(data):02x}".encode()


def decode_body(raw: bytes, limit: int = MAX_PACKET) -> bytes:
    """Undo escaping and run-length encoding; ProtocolError past limit or if malformed."""
    out = bytearray()
    i = 0
    while i < len(raw):
        b = raw[i]
        if b == ESCAPE:
            if i + 1 >= len(raw):
                raise ProtocolError("escape at the end of a packet")
            out.append(raw[i + 1] ^ 0x20)
            i += 2
        elif b == RLE:
            if not out or i + 1 >= len(raw):
                raise ProtocolError("run-length without a byte to repeat")
            count = raw[i + 1] - RLE_BIAS
            if count < 0:
                raise ProtocolError("bad run-length")
            out += bytes((out[-1],)) * count
            i += 2
        else:
            out.append(b)
            i += 1
        if len(out) > limit:
            raise ProtocolError("packet too long")
    return bytes(out)


class PacketReader:
    """Feed it bytes as they come; it returns the events they complete."""

    _IDLE, _DATA, _CS1, _CS2 = range(4)

    def __init__(self, limit: int = MAX_PACKET) -> None:
        self.limit = limit
        self._state = self._IDLE
        self._raw = bytearray()
        self._overflow = False
        self._cs = 0

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for b in data:
            event = self._byte(b)
            if event is not None:
                events.append(event)
        return events

    def _byte(self, b: int) -> Event | None:
        if self._state == self._IDLE:
            if b == START:
                self._state, self._overflow = self._DATA, False
                self._raw.clear()
            elif b == ord("+"):
                return Event(Kind.ACK)
            elif b == ord("-"):
                return Event(Kind.NACK)
            elif b == INTERRUPT:
                return Event(Kind.INTERRUPT)
            return None                         # noise between packets
        if self._state == self._DATA:
            if b == END:
                self._state = self._CS1
            elif b == START:
                self._raw.clear()               # a new packet starts: gdb gave up the old
                self._overflow = False
            elif len(self._raw) < 2 * self.limit + 2:   # escapes may double the raw size
                self._raw.append(b)
            else:
                self._overflow = True
            return None
        digit = _hex_digit(b)
        if self._state == self._CS1:
            self._cs, self._state = digit, self._CS2
            return None
        self._state = self._IDLE
        if digit < 0 or self._cs < 0 or self._overflow or \
                ((self._cs << 4) | digit) != checksum(self._raw):
            return Event(Kind.BAD)
        try:
            return Event(Kind.PACKET, decode_body(bytes(self._raw), self.limit))
        except ProtocolError:
            return Event(Kind.BAD)


def _hex_digit(b: int) -> int:
    if 0x30 <= b <= 0x39:
        return b - 0x30
    if 0x61 <= b <= 0x66:
        return b - 0x57
    if 0x41 <= b <= 0x46:
        return b - 0x37
    return -1


# -- packet bodies ---------------------------------------------------------------------

def parse_hex(text: bytes | str, max_digits: int = 16) -> int:
    """A hex number of at most max_digits digits (addresses and lengths are 64-bit)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not text or len(text) > max_digits or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ProtocolError(f"bad hex number {text[:20]!r}")
    return int(text, 16)


def unhex(text: bytes) -> bytes:
    if len(text) % 2:
        raise ProtocolError("odd number of hex digits")
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad hex data") from None


def addr_length(text: bytes) -> tuple[int, int]:
    """`addr,length` of m, M and X packets."""
    parts = text.split(b",")
    if len(parts) != 2:
        raise ProtocolError("expected addr,length")
    return parse_hex(parts[0]), parse_hex(parts[1])


def error(code: int) -> bytes:
    return f"E{code & 0xFF:02x}".encode()


def console(text: str) -> bytes:
    """An O packet: text for gdb's console while the target runs."""
    return b"O" + text.encode().hex().encode()

"""The guest agent's wire protocol, version 1 (docs/agent-protocol.md).

Frames, both ways:   u32 length (big-endian; counts the type byte and the payload)
                     | u8 type | payload
Request and control payloads are TLV lists:  u8 tag | u32 length (big-endian) | bytes
(ARGV and ENV may repeat; every other tag at most once).  STDIN, STDOUT, STDERR and
DATA frames carry raw bytes.  Integers in TLVs are big-endian u32 or u64, as the tag says.

The same tables are in firmware/agent/agent.c; the doc keeps them side by side.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Iterable, Iterator

from pyvmm.errors import PyvmmError

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")            # the length field
HEADER_SIZE = HEADER.size
MAX_FRAME_SIZE = 1 << 20                # largest length field either side accepts
DATA_CHUNK = 64 * 1024                  # bytes per STDIN/DATA frame this client sends
MAX_TLVS = 8192                         # TLVs in one frame (argv + env entries)
MAX_ENTROPY = 4096                      # bytes in one RESEED


class AgentError(PyvmmError):
    """The guest agent cannot be reached, refused a request or broke the protocol."""


class ProtocolError(AgentError):
    """A frame or TLV list that breaks docs/agent-protocol.md."""


class FrameType(IntEnum):
    HELLO = 0x01
    ERROR = 0x02
    OK = 0x03
    EXEC = 0x10
    STDIN = 0x11
    STDIN_CLOSE = 0x12
    SIGNAL = 0x13
    STDOUT = 0x14
    STDERR = 0x15
    EXIT = 0x16
    PUT_FILE = 0x20
    GET_FILE = 0x21
    DATA = 0x22
    DATA_END = 0x23
    HEALTH = 0x30
    SET_TIME = 0x31
    RESEED = 0x32


class Tag(IntEnum):
    VERSION = 1         # u32
    BUILD_ID = 2        # text
    ARGV = 3            # text, repeated
    ENV = 4             # "K=V", repeated
    CWD = 5             # text
    FLAGS = 6           # u32: ExecFlags or PutFlags
    TIMEOUT_MS = 7      # u64
    PTY_ROWS = 8        # u32
    PTY_COLS = 9        # u32
    PATH = 10           # text
    MODE = 11           # u32
    SIGNAL = 12         # u32
    TIME_NS = 13        # u64
    ENTROPY = 14        # bytes
    EXIT_CODE = 15      # u32
    TERM_SIGNAL = 16    # u32
    TIMED_OUT = 17      # u32 (0 or 1)
    ERRNO = 18          # u32
    MESSAGE = 19        # text
    UPTIME_MS = 20      # u64
    LOAD1_MILLI = 21    # u64
    MEM_TOTAL = 22      # u64
    MEM_FREE = 23       # u64
    PROCS = 24          # u64
    CONNECTIONS = 25    # u64


class ExecFlags(IntFlag):
    STDIN = 1
    PTY = 2


class PutFlags(IntFlag):
    MKDIRS = 1


U32_TAGS = frozenset({Tag.VERSION, Tag.FLAGS, Tag.PTY_ROWS, Tag.PTY_COLS, Tag.MODE, Tag.SIGNAL,
                      Tag.EXIT_CODE, Tag.TERM_SIGNAL, Tag.TIMED_OUT, Tag.ERRNO})
U64_TAGS = frozenset({Tag.TIMEOUT_MS, Tag.TIME_NS, Tag.UPTIME_MS, Tag.LOAD1_MILLI,
                      Tag.MEM_TOTAL, Tag.MEM_FREE, Tag.PROCS, Tag.CONNECTIONS})
REPEATABLE_TAGS = frozenset({Tag.ARGV, Tag.ENV})
RAW_FRAMES = frozenset({FrameType.STDIN, FrameType.STDOUT, FrameType.STDERR, FrameType.DATA})


# -- frames ------------------------------------------------------------------------------------

def encode_frame(ftype: FrameType, payload: bytes = b"") -> bytes:
    length = 1 + len(payload)
    if length > MAX_FRAME_SIZE:
        raise ProtocolError(f"a {ftype.name} frame of {length} bytes exceeds {MAX_FRAME_SIZE}")
    return HEADER.pack(length) + bytes([ftype]) + payload


@dataclass(frozen=True)
class Frame:
    type: FrameType
    payload: bytes

    def fields(self) -> "Fields":
        return Fields.decode(self.payload)


class FrameDecoder:
    """Frames out of a byte stream, buffering at most one frame (MAX_FRAME_SIZE)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buf += data
        while len(self._buf) >= HEADER_SIZE:
            (length,) = HEADER.unpack_from(self._buf)
            if not 1 <= length <= MAX_FRAME_SIZE:
                raise ProtocolError(f"the agent sent a frame length of {length}, "
                                    f"not within 1..{MAX_FRAME_SIZE}")
            if len(self._buf) < HEADER_SIZE + length:
                return
            raw_type = self._buf[HEADER_SIZE]
            payload = bytes(self._buf[HEADER_SIZE + 1:HEADER_SIZE + length])
            del self._buf[:HEADER_SIZE + length]
            try:
                ftype = FrameType(raw_type)
            except ValueError:
                raise ProtocolError(f"the agent sent an unknown frame type 0x{raw_type:02x}") from None
            yield Frame(ftype, payload)


# -- TLVs ----------------------------------------------------------------------------------------

def _value_bytes(tag: Tag, value: bytes | str | int) -> bytes:
    if tag in U32_TAGS:
        return struct.pack(">I", int(value))
    if tag in U64_TAGS:
        return struct.pack(">Q", int(value))
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ProtocolError(f"TLV {tag.name} takes bytes or text, not {type(value).__name__}")


def encode_tlvs(items: Iterable[tuple[Tag, bytes | str | int]]) -> bytes:
    out = bytearray()
    for tag, value in items:
        data = _value_bytes(tag, value)
        out += struct.pack(">BI", tag, len(data)) + data
    return bytes(out)


@dataclass
class Fields:
    """A decoded TLV list: repeated tags keep their order."""

    items: list[tuple[Tag, bytes]] = field(default_factory=list)

    @classmethod
    def decode(cls, payload: bytes) -> "Fields":
        items: list[tuple[Tag, bytes]] = []
        seen: set[Tag] = set()
        pos = 0
        while pos < len(payload):
            if len(payload) - pos < 5:
                raise ProtocolError("a TLV header is cut short")
            raw_tag, length = struct.unpack_from(">BI", payload, pos)
            pos += 5
            if length > len(payload) - pos:
                raise ProtocolError("a TLV runs past the end of its frame")
            try:
                tag = Tag(raw_tag)
            except ValueError:
                raise ProtocolError(f"unknown TLV tag {raw_tag}") from None
            if tag in seen and tag not in REPEATABLE_TAGS:
                raise ProtocolError(f"TLV {tag.name} repeated")
            value = payload[pos:pos + length]
            if tag in U32_TAGS and length != 4 or tag in U64_TAGS and length != 8:
                raise ProtocolError(f"TLV {tag.name} has {length} bytes")
            if len(items) == MAX_TLVS:
                raise ProtocolError(f"more than {MAX_TLVS} TLVs in one frame")
            seen.add(tag)
            items.append((tag, value))
            pos += length
        return cls(items)

    def get(self, tag: Tag) -> bytes | None:
        for item_tag, value in self.items:
            if item_tag == tag:
                return value
        return None

    def all(self, tag: Tag) -> list[bytes]:
        return [value for item_tag, value in self.items if item_tag == tag]

    def int(self, tag: Tag, default: int | None = None) -> int | None:
        value = self.get(tag)
        return default if value is None else int.from_bytes(value, "big")

    def text(self, tag: Tag, default: str = "") -> str:
        value = self.get(tag)
        return default if value is None else value.decode(errors="replace")


# -- requests ------------------------------------------------------------------------------------

def hello(version: int = PROTOCOL_VERSION) -> bytes:
    return encode_frame(FrameType.HELLO, encode_tlvs([(Tag.VERSION, version)]))


def exec_request(argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 stdin: bool = False, pty: bool = False, timeout_ms: int | None = None,
                 rows: int = 24, cols: int = 80) -> bytes:
    if not argv:
        raise AgentError("a command needs at least one argument (argv[0], the program)")
    items: list[tuple[Tag, bytes | str | int]] = [(Tag.ARGV, arg) for arg in argv]
    for key, value in (env or {}).items():
        if "=" in key or not key:
            raise AgentError(f"environment variable name {key!r} is empty or contains '='")
        items.append((Tag.ENV, f"{key}={value}"))
    if cwd is not None:
        items.append((Tag.CWD, cwd))
    flags = (ExecFlags.STDIN if stdin else 0) | (ExecFlags.PTY if pty else 0)
    if flags:
        items.append((Tag.FLAGS, int(flags)))
    if timeout_ms is not None:
        items.append((Tag.TIMEOUT_MS, max(1, timeout_ms)))
    if pty:
        items += [(Tag.PTY_ROWS, rows), (Tag.PTY_COLS, cols)]
    for tag, value in items:
        if isinstance(value, str) and "\0" in value:
            raise AgentError(f"{tag.name.lower()} {value!r} contains a NUL byte")
    return encode_frame(FrameType.EXEC, encode_tlvs(items))


def signal_request(signum: int) -> bytes:
    return encode_frame(FrameType.SIGNAL, encode_tlvs([(Tag.SIGNAL, signum)]))


def put_file_request(path: str, mode: int, mkdirs: bool) -> bytes:
    items: list[tuple[Tag, bytes | str | int]] = [(Tag.PATH, path), (Tag.MODE, mode)]
    if mkdirs:
        items.append((Tag.FLAGS, int(PutFlags.MKDIRS)))
    return encode_frame(FrameType.PUT_FILE, encode_tlvs(items))


def get_file_request(path: str) -> bytes:
    return encode_frame(FrameType.GET_FILE, encode_tlvs([(Tag.PATH, path)]))


def set_time_request(ns: int) -> bytes:
    return encode_frame(FrameType.SET_TIME, encode_tlvs([(Tag.TIME_NS, ns)]))


def reseed_request(entropy: bytes) -> bytes:
    if not 1 <= len(entropy) <= MAX_ENTROPY:
        raise AgentError(f"reseed takes 1 to {MAX_ENTROPY} bytes of entropy, not {len(entropy)}")
    return encode_frame(FrameType.RESEED, encode_tlvs([(Tag.ENTROPY, entropy)]))


def data_frames(ftype: FrameType, data: bytes) -> Iterator[bytes]:
    """STDIN or DATA frames of at most DATA_CHUNK bytes each."""
    view = memoryview(data)
    for start in range(0, len(view), DATA_CHUNK):
        yield encode_frame(ftype, bytes(view[start:start + DATA_CHUNK]))


def error_text(frame: Frame) -> str:
    """The message of an ERROR frame, tolerant of a bad payload."""
    try:
        return frame.fields().text(Tag.MESSAGE, "unknown error")
    except ProtocolError:
        return "the agent sent an unreadable ERROR frame"

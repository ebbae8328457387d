"""The agent's wire protocol on the Python side alone (no agent, no VM): frame and TLV
encoding round trips, bounds, and the requests the host must never send to a host
agent in tests (SET_TIME: checked here by its bytes only)."""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.agent import AgentClient, AgentError, connect_unix, connect_vsock_uds
from pyvmm.agent import protocol as p
from pyvmm.agent.protocol import Fields, FrameDecoder, FrameType, ProtocolError, Tag
from pyvmm.errors import PyvmmError


def decode_one(data: bytes) -> p.Frame:
    frames = list(FrameDecoder().feed(data))
    assert len(frames) == 1
    return frames[0]


def test_frame_layout_is_length_then_type_then_payload():
    assert p.encode_frame(FrameType.STDOUT, b"hi") == b"\x00\x00\x00\x03\x14hi"
    assert p.encode_frame(FrameType.DATA_END) == b"\x00\x00\x00\x01\x23"


def test_tlv_layout_and_integer_sizes():
    data = p.encode_tlvs([(Tag.ARGV, "ls"), (Tag.TIMEOUT_MS, 5), (Tag.MODE, 0o644)])
    assert data == (b"\x03\x00\x00\x00\x02ls" + b"\x07\x00\x00\x00\x08" + struct.pack(">Q", 5)
                    + b"\x0b\x00\x00\x00\x04" + struct.pack(">I", 0o644))


def test_set_time_request_encodes_nanoseconds_as_u64():
    # never sent to the host agent in tests: it would set the host's clock
    frame = decode_one(p.set_time_request(1_700_000_000_123_456_789))
    assert frame.type == FrameType.SET_TIME
    assert frame.fields().items == [(Tag.TIME_NS, struct.pack(">Q", 1_700_000_000_123_456_789))]


def test_exec_request_carries_argv_env_cwd_flags_timeout_and_pty_size():
    frame = decode_one(p.exec_request(["sh", "-c", "x"], {"A": "1"}, "/tmp", stdin=True, pty=True,
                                      timeout_ms=1500, rows=30, cols=100))
    f = frame.fields()
    assert f.all(Tag.ARGV) == [b"sh", b"-c", b"x"]
    assert f.all(Tag.ENV) == [b"A=1"]
    assert f.get(Tag.CWD) == b"/tmp"
    assert f.int(Tag.FLAGS) == p.ExecFlags.STDIN | p.ExecFlags.PTY
    assert (f.int(Tag.TIMEOUT_MS), f.int(Tag.PTY_ROWS), f.int(Tag.PTY_COLS)) == (1500, 30, 100)


@pytest.mark.parametrize("argv, env", [([], None), (["a\0b"], None), (["ls"], {"A=B": "1"}), (["ls"], {"": "1"})])
def test_exec_request_refuses_what_the_agent_would_refuse(argv, env):
    with pytest.raises(AgentError):
        p.exec_request(argv, env)


def test_errors_are_pyvmm_errors():
    assert issubclass(ProtocolError, AgentError) and issubclass(AgentError, PyvmmError)


@given(st.lists(st.tuples(st.sampled_from([Tag.ARGV, Tag.ENV]), st.binary(max_size=50)), max_size=20),
       st.binary(max_size=200))
def test_tlvs_and_frames_round_trip(items, payload):
    fields = Fields.decode(p.encode_tlvs(items))
    assert fields.items == items
    stream = p.encode_frame(FrameType.STDOUT, payload) + p.encode_frame(FrameType.EXIT, p.encode_tlvs(items))
    decoder = FrameDecoder()
    frames = [f for i in range(len(stream)) for f in decoder.feed(stream[i:i + 1])]
    assert [(f.type, f.payload) for f in frames] == [(FrameType.STDOUT, payload),
                                                     (FrameType.EXIT, p.encode_tlvs(items))]


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_decoders_raise_only_protocol_error_on_garbage(data):
    for decode in (Fields.decode, lambda d: list(FrameDecoder().feed(d))):
        try:
            decode(data)
        except ProtocolError:
            pass


def test_decoder_refuses_oversize_frames_before_buffering_them():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="frame length"):
        list(decoder.feed(struct.pack(">I", p.MAX_FRAME_SIZE + 1)))
    with pytest.raises(ProtocolError, match="frame length"):
        list(FrameDecoder().feed(b"\x00\x00\x00\x00"))


def test_tlv_decoder_checks_integer_sizes_and_repeats():
    with pytest.raises(ProtocolError, match="has 3 bytes"):
        Fields.decode(b"\x0b\x00\x00\x00\x03abc")
    with pytest.raises(ProtocolError, match="repeated"):
        Fields.decode(p.encode_tlvs([(Tag.PATH, "a"), (Tag.PATH, "b")]))
    with pytest.raises(ProtocolError, match="unknown TLV tag"):
        Fields.decode(b"\xee\x00\x00\x00\x00")


def test_data_frames_are_chunked():
    frames = list(p.data_frames(FrameType.STDIN, b"x" * (p.DATA_CHUNK * 2 + 1)))
    assert [len(f) - 5 for f in frames] == [p.DATA_CHUNK, p.DATA_CHUNK, 1]


# -- connectors and timeouts, against stand-in servers --------------------------------------------

class StandIn:
    """A Unix socket server in a thread that hands each connection to `handle`."""

    def __init__(self, path: str, handle) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(8)
        self.handle = handle
        self.held: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.held.append(conn)
            self.handle(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


def test_vsock_connector_times_out_with_one_clear_sentence(tmp_path):
    path = str(tmp_path / "v.sock")
    start = time.monotonic()
    with pytest.raises(AgentError) as info:
        connect_vsock_uds(path, port=1024, timeout=0.3)
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert message.startswith(f"no agent answered on vsock port 1024 through {path} within 0.3 s")
    assert message.endswith("is the guest booted with the agent?")


def test_vsock_connector_retries_until_the_guest_listens(tmp_path):
    path = str(tmp_path / "v.sock")
    attempts = []

    def firecracker(conn: socket.socket) -> None:
        request = conn.recv(64)
        attempts.append(request)
        if len(attempts) < 3:
            conn.close()            # the guest is not listening yet: Firecracker hangs up
        else:
            conn.sendall(b"OK 1073741824\n")

    server = None

    def late_start():
        nonlocal server
        time.sleep(0.2)             # the VMM creates its socket a little later
        server = StandIn(path, firecracker)
    starter = threading.Thread(target=late_start)
    starter.start()
    try:
        sock = connect_vsock_uds(path, port=1234, timeout=5)
        sock.close()
    finally:
        starter.join()
        server.close()
    assert attempts == [b"CONNECT 1234\n"] * 3


def test_a_silent_agent_gives_an_error_not_a_hang(tmp_path):
    path = str(tmp_path / "silent.sock")
    server = StandIn(path, lambda conn: None)      # accepts, never answers
    try:
        start = time.monotonic()
        with pytest.raises(AgentError, match="did not answer"):
            AgentClient.connect(lambda: connect_unix(path), timeout=0.3)
        assert time.monotonic() - start < 2
    finally:
        server.close()


def test_a_garbage_speaking_agent_gives_a_protocol_error(tmp_path):
    path = str(tmp_path / "garbage.sock")
    server = StandIn(path, lambda conn: conn.sendall(b"\xff\xff\xff\xff\x01"))
    try:
        with pytest.raises(ProtocolError, match="frame length"):
            AgentClient.connect(lambda: connect_unix(path), timeout=2)
    finally:
        server.close()


def test_no_socket_is_a_clear_error(tmp_path):
    with pytest.raises(AgentError, match="cannot connect to the agent's socket"):
        connect_unix(str(tmp_path / "none.sock"))

"""Snapshots without booting Linux (test_snapshot_linux.py boots it).

1. KVM state round trip on tiny guests (ring 0 and ring 3, 2 vCPUs, in-kernel
   irqchip): saved here, restored in a fresh process, which checks that every
   GET/SET pair round-trips and that both vCPUs count on from where they were.
2. The state file format: every way a file can be wrong is one SnapshotError
   line; hypothesis on random bytes and random mutations of a valid file.
3. Restoring hostile saved state (hypothesis): a tiny machine's state and the
   UART's and i8042's, mutated field by field, raise only the state errors.
4. Snapshot create/load at the MicroVM and API level (a stand-in VM where one
   must run): Firecracker's state rules and messages, bad bodies (400, the
   process stays usable), hypothesis on both routes' bodies.
5. open_snapshot's refusals on synthetic but otherwise valid state files.
6. merge(): what it refuses, and that it copies exactly the marked pages.
7. The CLI: `pyvmm snapshot info`, and `pyvmm run` flags that cannot go together.

Budget: the whole module in well under 30 s; hypothesis runs EXAMPLES examples
per property (PYVMM_FUZZ_EXAMPLES, 200 by default).
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyvmm.api.schema import request_schema, validate
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.uart import Uart
from pyvmm.devices.virtio.state import StateError
from pyvmm.kvm.ioctl import KvmError
from pyvmm.microvm import AFTER_START, BEFORE_START, LOAD_NOT_ALLOWED, NOT_PAUSED, \
    MicroVM, MicroVMError
from pyvmm.snapshot import LoadRequest, merge, open_snapshot, parse_create
from pyvmm.snapshot import memfile
from pyvmm.snapshot.format import FORMAT_VERSION, HEADER, MAGIC, MAX_BODY, SnapshotError, \
    read_state_file, write_state_file
from pyvmm.testbed import Mode
from tests.framework import snapshots as S
from tests.framework.api import CheckedClient, FakeLinuxVm, serve, write_api_files

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
PAGE = 4096
MiB = 1 << 20


def one_line(exc: BaseException, *words: str) -> str:
    """The error's message: one line, holding each of words."""
    message = str(exc)
    assert message and "\n" not in message, repr(message)
    for word in words:
        assert word in message, (word, message)
    return message


# == 1. KVM state round trip on tiny guests ==================================================

# MSRs whose value may legitimately differ between a restore and a save right after it.
MOVING_MSRS = {
    0x10: "IA32_TSC: the TSC runs on between the SET and the GET",
    0x3B: "IA32_TSC_ADJUST: KVM adjusts it as the TSC is written",
    0x6E0: "IA32_TSC_DEADLINE: a TSC value; KVM reads it back as 0 once passed",
    0x11: "MSR_KVM_WALL_CLOCK (kvmclock)", 0x12: "MSR_KVM_SYSTEM_TIME (kvmclock)",
    0x4B564D00: "MSR_KVM_WALL_CLOCK_NEW (kvmclock)",
    0x4B564D01: "MSR_KVM_SYSTEM_TIME_NEW (kvmclock)",
    # Hyper-V's counters, which hardware KVM lists (seen under SVM, not on PVM).
    0x40000010: "HV_X64_MSR_VP_RUNTIME: the vCPU's run time so far",
    0x40000020: "HV_X64_MSR_TIME_REF_COUNT: a 100 ns reference clock",
}
# struct kvm_pit_state2: 3 channels of 24 bytes, each ending in count_load_time, the
# host's ktime when the count was loaded: KVM_SET_PIT2 reloads it with the host's now.
PIT_CHANNEL_SIZE, PIT_LOAD_TIME_OFFSET, PIT_STATE_SIZE = 24, 16, 112


def _pit_without_load_times(blob: str) -> bytes:
    data = bytearray(base64.b64decode(blob))
    assert len(data) == PIT_STATE_SIZE
    for channel in range(3):
        start = channel * PIT_CHANNEL_SIZE + PIT_LOAD_TIME_OFFSET
        data[start:start + 8] = bytes(8)
    return bytes(data)


def _regs(vcpu_state: dict):
    from pyvmm.kvm import ffi
    regs = ffi.new("struct kvm_regs *")
    data = base64.b64decode(vcpu_state["regs"])
    ffi.memmove(regs, data, len(data))
    sregs = ffi.new("struct kvm_sregs *")
    data = base64.b64decode(vcpu_state["sregs"])
    ffi.memmove(sregs, data, len(data))
    return regs, sregs


def assert_same_vcpu_state(saved: dict, again: dict, what: str) -> set[int]:
    """Every field equal but MOVING_MSRS; returns the MSRs that moved."""
    assert set(saved) == set(again), what
    for key in saved:
        if key != "msrs":
            assert saved[key] == again[key], f"{what}: {key} did not round-trip"
    before, after = dict(map(tuple, saved["msrs"])), dict(map(tuple, again["msrs"]))
    assert set(before) == set(after), f"{what}: the MSR lists differ"
    moved = {index for index in before if before[index] != after[index]}
    assert moved <= set(MOVING_MSRS), \
        f"{what}: MSRs {[hex(i) for i in sorted(moved - set(MOVING_MSRS))]} did not round-trip"
    return moved


@pytest.mark.kvm
@pytest.mark.parametrize("mode", [Mode.LONG_RING0, Mode.LONG_RING3], ids=["ring0", "ring3"])
def test_tiny_guest_state_round_trips_into_a_fresh_process(tmp_path, mode):
    """Run, pause, save (state + memory file), close; a fresh process restores it,
    saves again at once (every GET/SET pair round-trips), starts paused (nothing
    moves), resumes (both vCPUs count on from the saved values)."""
    vm = S.counting_tinyvm(mode)
    try:
        machine = vm.machine
        machine.start()
        assert S.wait_for(lambda: min(S.counters(machine.memory)) >= 50, 20), \
            S.counters(machine.memory)
        machine.pause()
        state = machine.save_state()
        saved = S.counters(machine.memory)
        assert machine.outcome is None
        mem_path = tmp_path / "vm.mem"
        memfile.write_full(machine.memory, mem_path)
        layout = machine.memory.layout
    finally:
        vm.close()
    code_end = vm.entry + 64
    state_path = tmp_path / "vm.state"
    write_state_file(state_path, {"kvm": state, "counters": saved,
                                  "memory": {"regions": [list(r) for r in layout]}})

    child = subprocess.run([sys.executable, "-m", "tests.framework.snapshots", str(state_path),
                            str(mem_path)], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.splitlines()[-1])

    # Restore, then save: the same state (but for what moves with time).
    for index, (before, after) in enumerate(zip(state["vcpus"], report["resaved"]["vcpus"])):
        assert_same_vcpu_state(before, after, f"vCPU {index}")
    vm_before, vm_after = state["vm"], report["resaved"]["vm"]
    for chip in ("pic_master", "pic_slave", "ioapic"):
        assert vm_before[chip] == vm_after[chip], f"{chip} did not round-trip"
    assert _pit_without_load_times(vm_before["pit"]) == _pit_without_load_times(vm_after["pit"])
    # kvmclock was set to the saved value: it reads back at or a little after it.
    assert 0 <= vm_after["clock"] - vm_before["clock"] < 10 * 10**9

    # The counters: as saved, still as saved while paused, then on from there.
    assert report["at_restore"] == saved
    assert report["paused_flag"] is True
    assert report["while_paused"] == saved
    assert all(after > before for after, before in zip(report["after_resume"], saved)), \
        (saved, report["after_resume"])
    assert report["outcome"] is None            # still running when paused again
    ring = 3 if mode == Mode.LONG_RING3 else 0
    for index, vcpu in enumerate(report["final"]["vcpus"]):
        regs, sregs = _regs(vcpu)
        # rbx and rdi were set before the snapshot: only a restore can have them here.
        assert (regs.rdi, regs.rbx) == (index, S.COUNTERS + 8 * index)
        assert vm.entry <= regs.rip < code_end
        assert sregs.cs.selector & 3 == ring and sregs.cs.l == 1
        assert sregs.efer & (1 << 10)           # still in long mode


@pytest.mark.kvm
def test_state_is_saved_only_while_paused_and_restored_only_before_start():
    from pyvmm.machine import MachineError
    vm = S.counting_tinyvm(Mode.LONG_RING3)
    with vm:
        machine = vm.machine
        state = machine.save_state()                 # before start: fine
        machine.start()
        with pytest.raises(MachineError, match="pause first"):
            machine.save_state()
        with pytest.raises(MachineError, match="before starting"):
            machine.restore_state(state)
        machine.pause()
        assert machine.save_state()["vcpus"][1]["index"] == 1
        before = S.counters(machine.memory)
        machine.resume()
        assert S.wait_for(lambda: all(now > then for now, then in
                                      zip(S.counters(machine.memory), before)), 10)


@pytest.mark.kvm
def test_restore_refuses_state_of_another_shape():
    from pyvmm.machine import Machine
    with S.counting_tinyvm(Mode.LONG_RING0) as vm:
        state = vm.machine.save_state()
    with Machine(S.MEM_SIZE, 1, irqchip=True) as one:
        one_line(pytest.raises(StateError, one.restore_state, state).value, "list of 1")
    with Machine(S.MEM_SIZE, 2, irqchip=False) as no_irqchip:
        one_line(pytest.raises(StateError, no_irqchip.restore_state, state).value, "LAPIC")
    with Machine(S.MEM_SIZE, 2, irqchip=True) as machine:
        for bad in (None, [], {"vcpus": state["vcpus"]}, {"vm": state["vm"]}):
            one_line(pytest.raises(StateError, machine.restore_state, bad).value)


# == 2. The state file format ==============================================================

BODY = {"snapshot_type": "Full", "kvm": {"vcpus": [{"index": 0, "regs": "AAAA"}]},
        "text": "\u00e9t\u00e9", "numbers": list(range(40))}


@pytest.fixture
def state_file(tmp_path) -> Path:
    path = tmp_path / "vm.state"
    write_state_file(path, BODY)
    return path


def refused(path: Path, *words: str) -> str:
    with pytest.raises(SnapshotError) as err:
        read_state_file(path)
    return one_line(err.value, str(path), *words)


def test_a_state_file_round_trips_and_is_written_owner_only(state_file):
    assert read_state_file(state_file) == BODY
    data = state_file.read_bytes()
    magic, version, flags, length, digest = HEADER.unpack(data[:HEADER.size])
    assert (magic, version, flags, length) == (MAGIC, FORMAT_VERSION, 0, len(data) - HEADER.size)
    assert digest == hashlib.sha256(data[HEADER.size:]).digest()
    assert state_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in state_file.parent.iterdir()] == ["vm.state"]   # no temp file left


@pytest.mark.parametrize("cut", [0, 1, 8, 30, HEADER.size - 1, HEADER.size, HEADER.size + 1,
                                 HEADER.size + 40, -1])
def test_a_truncated_state_file_is_refused_in_one_line(state_file, cut):
    data = state_file.read_bytes()
    state_file.write_bytes(data[:cut])
    if cut < HEADER.size and cut >= 0:
        refused(state_file, "not a pyvmm snapshot", f"only {cut} bytes")
    else:
        refused(state_file, "truncated")


def test_a_flipped_byte_anywhere_is_refused_in_one_line(state_file):
    data = state_file.read_bytes()
    where = {range(0, 8): "not a pyvmm snapshot", range(8, 12): "version",
             range(12, 16): "header flags", range(24, 56): "checksum",
             range(56, len(data)): "checksum"}
    for position in range(len(data)):
        for flip in (0x01, 0x80):
            broken = bytearray(data)
            broken[position] ^= flip
            state_file.write_bytes(broken)
            words = [w for r, w in where.items() if position in r]
            if 16 <= position < 24:     # the length: short of the body, or past it
                message = refused(state_file)
                assert "truncated" in message or "claims" in message, message
            else:
                refused(state_file, *words)


def test_another_version_is_refused_in_one_line(state_file):
    data = bytearray(state_file.read_bytes())
    data[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    state_file.write_bytes(data)
    refused(state_file, f"version {FORMAT_VERSION + 1} snapshot", "take the snapshot again")


def test_the_memory_file_in_place_of_the_state_file_is_refused(tmp_path):
    mem = tmp_path / "vm.mem"
    mem.write_bytes(bytes(PAGE) + os.urandom(PAGE))
    refused(mem, "not a pyvmm snapshot state file", "not the memory file")


def test_trailing_bytes_are_refused(state_file):
    with open(state_file, "ab") as f:
        f.write(b"\0")
    refused(state_file, "trailing bytes")


@pytest.mark.parametrize("length", [MAX_BODY + 1, 1 << 40, (1 << 64) - 1])
def test_a_header_claiming_a_giant_length_is_refused(state_file, length):
    data = bytearray(state_file.read_bytes())
    data[16:24] = struct.pack("<Q", length)
    state_file.write_bytes(data)
    refused(state_file, "claims", "corrupt")


def test_a_length_up_to_the_maximum_on_a_short_file_is_truncation(state_file):
    data = bytearray(state_file.read_bytes())
    data[16:24] = struct.pack("<Q", MAX_BODY)
    state_file.write_bytes(data)
    refused(state_file, "truncated")


def _forge(path: Path, body: bytes, version: int = FORMAT_VERSION) -> Path:
    """A state file around any body, with a correct header and checksum."""
    path.write_bytes(HEADER.pack(MAGIC, version, 0, len(body), hashlib.sha256(body).digest())
                     + body)
    return path


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe{}", b"not json", b'{"a": NaN',
                                  b"[" * 100000 + b"]" * 100000,
                                  b'{"a": ' + b"1" * 10000 + b"}"],
                         ids=["empty", "open", "utf16ish", "words", "nan", "deep", "bigint"])
def test_a_body_that_is_not_json_is_refused(tmp_path, body):
    refused(_forge(tmp_path / "vm.state", body), "not valid JSON")


@pytest.mark.parametrize("body", [b"[]", b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_a_body_that_is_not_an_object_is_refused(tmp_path, body):
    refused(_forge(tmp_path / "vm.state", body), "not a JSON object")


def test_paths_that_are_not_files_are_refused(tmp_path):
    refused(tmp_path / "nothing", "cannot read", "No such file")
    refused(tmp_path, "cannot read")


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.binary(max_size=300) | st.binary(max_size=60).map(lambda b: MAGIC + b))
def test_random_bytes_raise_only_snapshot_error(fuzz_dir, data):
    path = fuzz_dir / "random.state"
    path.write_bytes(data)
    with pytest.raises(SnapshotError) as err:
        read_state_file(path)
    one_line(err.value)


def _valid_file_bytes() -> bytes:
    data = json.dumps(BODY, separators=(",", ":"), sort_keys=True).encode()
    return HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(data), hashlib.sha256(data).digest()) + data


VALID_FILE = _valid_file_bytes()
mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(VALID_FILE) - 1), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID_FILE)), st.binary(min_size=1,
                                                                          max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, len(VALID_FILE) - 1), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID_FILE)), st.just(None)))


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_random_mutations_of_a_valid_file_raise_only_snapshot_error(fuzz_dir, mutations):
    data = bytearray(VALID_FILE)
    for kind, position, arg in mutations:
        position = min(position, len(data))
        if kind == "set" and position < len(data):
            data[position] = arg
        elif kind == "insert":
            data[position:position] = arg
        elif kind == "delete":
            del data[position:position + arg]
        elif kind == "truncate":
            del data[position:]
    path = fuzz_dir / "mutated.state"
    path.write_bytes(data)
    try:
        body = read_state_file(path)
    except SnapshotError as exc:
        one_line(exc)
    else:
        assert bytes(data) == VALID_FILE and body == BODY


# == 3. Restoring hostile saved state =======================================================

DELETE = object()
WRONG_TYPES = [None, True, False, 1.5, "x", "", [], {}, [0], {"a": 1}]
BAD_INTS = [-1, -(2**63), 2**32, 2**32 - 1, 2**63, 2**64 - 1, 2**64, 2**100, 10**400]
GARBAGE_BASE64 = ["!!!!", "abc", "YQ", "====", "\u00e9\u00e9\u00e9\u00e9", "AAAA\n", "A" * 5,
                  " AAAA", "AA==AA=="]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _replacements(node: object, in_type: bool = False) -> st.SearchStrategy:
    """What a field may be replaced by: the wrong type, a bad number, garbage, and
    near-misses of its own kind (a blob of another length, a list of another length).
    in_type: only values of its own type and size (what gets past the checks and into
    the KVM ioctls)."""
    if in_type:
        if type(node) is int:
            return st.sampled_from([0, node + 1, max(0, node - 1), node ^ 1]) | \
                st.integers(0, 2**32 - 1) | st.integers(0, 2**64 - 1)
        if type(node) is str:
            try:
                data = base64.b64decode(node, validate=True)
            except ValueError:
                data = b""
            if data:
                return st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)),
                                min_size=1, max_size=4).map(lambda f: _b64(_flipped(data, f)))
        return st.just(node)
    options = [st.sampled_from([DELETE] + WRONG_TYPES + BAD_INTS)]
    if type(node) is int:
        options += [st.sampled_from([0, node + 1, max(0, node - 1), node ^ 1]),
                    st.integers(0, 2**64 - 1)]
    elif type(node) is str:
        try:
            data = base64.b64decode(node, validate=True)
        except ValueError:
            data = b""
        options += [st.sampled_from(GARBAGE_BASE64),
                    st.integers(-64, 64).map(lambda d: _b64(data[:len(data) + d] if d < 0
                                                            else data + bytes(d))),
                    st.just(data).map(lambda d: _b64(d * 300))]
        if data:
            # Blobs of the right length with bytes changed: into the KVM ioctls.
            options.append(st.lists(st.tuples(st.integers(0, len(data) - 1),
                                               st.integers(1, 255)), min_size=1, max_size=4)
                           .map(lambda flips: _b64(_flipped(data, flips))))
    elif type(node) is list:
        options.append(st.sampled_from([node[:-1], node + node[-1:] if node else [None],
                                        node[::-1], node * 2, (node or [0]) * 300]))
    elif type(node) is dict:
        options.append(st.sampled_from([{}, {**node, "unknown": 1}]))
    return st.one_of(options)


def _flipped(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, xor in flips:
        out[position] ^= xor
    return bytes(out)


@st.composite
def mutated(draw, state: dict, max_mutations: int = 3, in_type: bool = False) -> object:
    """state with 1..max_mutations fields replaced or deleted, at any depth (in_type:
    see _replacements)."""
    state = copy.deepcopy(state)
    for _ in range(draw(st.integers(1, max_mutations))):
        parent, key, node = None, None, state
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 5)) > 0:
            key = draw(st.sampled_from(sorted(node)) if isinstance(node, dict)
                       else st.integers(0, len(node) - 1))
            parent, node = node, node[key]
        # A copy: the value must not share objects with WRONG_TYPES or with the state
        # (a later mutation may go into it).
        value = draw(_replacements(node, in_type))
        if value is not DELETE:
            value = copy.deepcopy(value)
        if parent is None:
            state = {} if value is DELETE else value
        elif value is DELETE:
            del parent[key]
        else:
            parent[key] = value
    return state


@pytest.fixture(scope="module")
def tiny_state(kvm_problem):
    """A paused 2-vCPU ring-0 tiny guest's state (irqchip), and a shared /dev/kvm."""
    from pyvmm.kvm import Kvm
    if kvm_problem is not None:
        # Set up before conftest's (function-scoped) kvm check: the same rule here.
        if os.environ.get("PYVMM_REQUIRE_KVM") == "1":
            pytest.fail(f"KVM is required (PYVMM_REQUIRE_KVM=1) but unusable: {kvm_problem}")
        pytest.skip(f"no usable KVM: {kvm_problem}")
    with S.counting_tinyvm(Mode.LONG_RING0) as vm:
        vm.machine.start()
        S.wait_for(lambda: min(S.counters(vm.machine.memory)) > 0, 10)
        vm.machine.pause()
        state = vm.machine.save_state()
    kvm = Kvm()
    yield state, kvm
    kvm.close()


@pytest.mark.kvm
def test_the_tiny_state_restores_as_it_is(tiny_state):
    from pyvmm.machine import Machine
    state, kvm = tiny_state
    with Machine(S.MEM_SIZE, S.VCPUS, irqchip=True, kvm=kvm) as machine:
        machine.restore_state(copy.deepcopy(state))


@pytest.mark.kvm
@FUZZ
@given(data=st.data())
def test_mutated_machine_state_raises_only_state_or_kvm_errors(tiny_state, data):
    from pyvmm.machine import Machine
    state, kvm = tiny_state
    bad = data.draw(mutated(state) | mutated(state, in_type=True))
    with Machine(S.MEM_SIZE, S.VCPUS, irqchip=True, kvm=kvm) as machine:
        try:
            machine.restore_state(bad)
        except (StateError, SnapshotError, KvmError) as exc:
            one_line(exc)


def _uart_state() -> dict:
    uart = Uart(lambda data: None)
    for offset, value in ((3, 0x80), (0, 0x01), (1, 0x00), (3, 0x03), (1, 0x03), (4, 0x0B),
                          (2, 0xC7), (7, 0x5A)):
        uart.write(offset, bytes([value]))
    uart.feed(b"typed ahead")
    return uart.save()


def _i8042_state() -> dict:
    i8042 = I8042()
    i8042.write(4, bytes([0x60]))       # write the command byte: next data byte
    i8042.write(0, bytes([0x47]))
    i8042.write(0, bytes([0xF2]))       # keyboard: identify -> ACK + 2 ID bytes
    return i8042.save()


DEVICES = {"uart": (lambda: Uart(lambda data: None), _uart_state()),
           "i8042": (I8042, _i8042_state())}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=12)


@FUZZ
@given(device=st.sampled_from(sorted(DEVICES)), data=st.data())
def test_hostile_device_state_raises_only_state_error_and_applies_nothing(device, data):
    make, valid = DEVICES[device]
    bad = data.draw(mutated(valid) | json_values |
                    st.fixed_dictionaries({}, optional={k: json_values for k in valid}))
    target = make()
    before = target.save()
    try:
        target.restore(bad)
    except StateError as exc:
        one_line(exc)
        assert target.save() == before, "a refused state was partly applied"
    else:
        # Accepted: it is what the device holds now (keys it does not know are ignored).
        after = target.save()
        for key, value in after.items():
            if key == "rx":
                assert base64.b64decode(value) == base64.b64decode(bad[key])
            else:
                assert value == bad[key], key


def test_device_state_round_trips():
    for name, (make, valid) in DEVICES.items():
        device = make()
        device.restore(copy.deepcopy(valid))
        assert device.save() == valid, name


# == 4. Snapshot create and load: MicroVM and API ==============================================

@pytest.fixture
def snap_api(tmp_path):
    """(client, MicroVM, files): an API server over an unconfigured MicroVM whose VM is
    a stand-in that can be snapshotted."""
    files = write_api_files(tmp_path)
    vm, server = serve(tmp_path, request_timeout=1.0, idle_timeout=5.0)
    vm.vm_factory = S.SnapshottingFakeVm
    client = CheckedClient(server.path)
    yield client, vm, files
    client.close()
    server.close()
    vm.close()


def configure_boot(client: CheckedClient, files: Path) -> None:
    client.call("PUT", "/boot-source", {"kernel_image_path": str(files / "vmlinux")}, 204)


def send(client: CheckedClient, method: str, url: str, body) -> tuple[int, object]:
    """body as JSON, null included (the client sends no body at all for None)."""
    return client.call(method, url, raw=json.dumps(body).encode())


def fault(client: CheckedClient, method: str, url: str, body) -> str:
    """The fault_message of a request that must be refused: one line."""
    status, payload = send(client, method, url, body)
    assert status == 400, (method, url, body, payload)
    message = payload["fault_message"]
    assert "\n" not in message, message
    return message


def load_body(files: Path, **extra) -> dict:
    return {"snapshot_path": str(files / "no.state"),
            "mem_backend": {"backend_type": "File", "backend_path": str(files / "no.mem")},
            **extra}


def create_body(files: Path, **extra) -> dict:
    return {"snapshot_path": str(files / "vm.state"), "mem_file_path": str(files / "vm.mem"),
            **extra}


def assert_usable_and_not_started(client: CheckedClient, vm: MicroVM) -> None:
    status, info = client.call("GET", "/", expect=200)
    assert info["state"] == "Not started" and vm.state == "Not started"


def test_create_before_start_is_refused(snap_api):
    client, vm, files = snap_api
    assert fault(client, "PUT", "/snapshot/create", create_body(files)) == BEFORE_START
    # The state is checked before the body.
    assert fault(client, "PUT", "/snapshot/create", {"bad": 1}) == BEFORE_START
    with pytest.raises(MicroVMError) as err:
        vm.snapshot(files / "vm.state", files / "vm.mem")
    assert str(err.value) == BEFORE_START
    assert_usable_and_not_started(client, vm)


def test_create_needs_a_paused_vm(snap_api):
    client, vm, files = snap_api
    configure_boot(client, files)
    client.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    fake = FakeLinuxVm.instances[-1]
    assert fault(client, "PUT", "/snapshot/create", create_body(files)) == NOT_PAUSED
    with pytest.raises(MicroVMError) as err:
        vm.snapshot(files / "vm.state", files / "vm.mem")
    assert str(err.value) == NOT_PAUSED
    # A bad body while running is refused for what it is.
    assert "snapshot_type" in fault(client, "PUT", "/snapshot/create",
                                    create_body(files, snapshot_type="Incremental"))
    client.call("PATCH", "/vm", {"state": "Paused"}, 204)
    client.call("PUT", "/snapshot/create", create_body(files), 204)
    client.call("PUT", "/snapshot/create", create_body(files, snapshot_type="Diff"), 204)
    assert [c for c in fake.calls if isinstance(c, tuple)] == [
        ("snapshot", str(files / "vm.state"), str(files / "vm.mem"), "Full"),
        ("snapshot", str(files / "vm.state"), str(files / "vm.mem"), "Diff")]
    assert client.call("GET", "/")[1]["state"] == "Paused"      # stays paused, as Firecracker
    client.call("PATCH", "/vm", {"state": "Resumed"}, 204)
    assert fault(client, "PUT", "/snapshot/create", create_body(files)) == NOT_PAUSED
    # Load is not for a started VM, whatever its body.
    assert fault(client, "PUT", "/snapshot/load", load_body(files)) == AFTER_START
    assert fault(client, "PUT", "/snapshot/load", {"x": 1}) == AFTER_START
    client.call("PATCH", "/vm", {"state": "Paused"}, 204)
    assert fault(client, "PUT", "/snapshot/load", load_body(files)) == AFTER_START
    fake.stop()
    assert vm.wait(5) is not None
    assert "exited" in fault(client, "PUT", "/snapshot/create", create_body(files))


BOOT_SPECIFIC = {
    "boot-source": lambda f: ("PUT", "/boot-source", {"kernel_image_path": str(f / "vmlinux")}),
    "machine-config": lambda f: ("PUT", "/machine-config", {"vcpu_count": 2,
                                                            "mem_size_mib": 256}),
    "machine-config-patch": lambda f: ("PATCH", "/machine-config", {"mem_size_mib": 512}),
    "drive": lambda f: ("PUT", "/drives/data", {"drive_id": "data", "is_root_device": False,
                                                "path_on_host": str(f / "data.img")}),
    "network-interface": lambda f: ("PUT", "/network-interfaces/eth0",
                                    {"iface_id": "eth0", "host_dev_name": "tap0"}),
    "entropy": lambda f: ("PUT", "/entropy", {}),
    "vsock": lambda f: ("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(f / "v.sock")}),
}


@pytest.mark.parametrize("resource", sorted(BOOT_SPECIFIC))
def test_load_after_boot_specific_configuration_is_firecrackers_refusal(snap_api, resource):
    client, vm, files = snap_api
    method, url, body = BOOT_SPECIFIC[resource](files)
    client.call(method, url, body, 204)
    before = client.payload("GET", "/vm/config", expect=200)
    assert fault(client, "PUT", "/snapshot/load", load_body(files)) == LOAD_NOT_ALLOWED
    with pytest.raises(MicroVMError) as err:
        vm.load_snapshot(LoadRequest.from_json(load_body(files)))
    assert str(err.value) == LOAD_NOT_ALLOWED
    assert client.payload("GET", "/vm/config", expect=200) == before
    assert_usable_and_not_started(client, vm)


def test_load_after_a_machine_config_of_default_values_is_refused_too(snap_api):
    """Firecracker refuses a load after any PUT or PATCH /machine-config (each sets its
    boot_path flag), whatever the values: a client that sends the defaults explicitly
    has configured the machine all the same."""
    client, vm, files = snap_api
    client.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}, 204)
    assert fault(client, "PUT", "/snapshot/load", load_body(files)) == LOAD_NOT_ALLOWED


@pytest.mark.kvm
def test_load_after_only_logger_and_metrics_is_allowed(snap_api):
    client, vm, files = snap_api
    client.call("PUT", "/logger", {"log_path": str(files / "fc.log"), "level": "Info"}, 204)
    client.call("PUT", "/metrics", {"metrics_path": str(files / "metrics.json")}, 204)
    client.call("PUT", "/serial", {"serial_out_path": str(files / "console.log")}, 204)
    message = fault(client, "PUT", "/snapshot/load", load_body(files))
    assert message != LOAD_NOT_ALLOWED
    assert str(files / "no.state") in message and "No such file" in message, message
    assert_usable_and_not_started(client, vm)
    config = client.payload("GET", "/vm/config", expect=200)
    assert config["logger"]["level"] == "Info" and config["boot-source"] is None


BAD_LOAD_BODIES = [
    (lambda f: {**load_body(f), "mem_file_path": str(f / "no.mem")}, "exactly one of"),
    (lambda f: {"snapshot_path": str(f / "no.state")}, "exactly one of"),
    (lambda f: load_body(f, mem_backend={"backend_type": "Tape",
                                         "backend_path": str(f / "m")}), "'Tape' is invalid"),
    (lambda f: load_body(f, mem_backend={"backend_type": "File"}), "backend_path"),
    (lambda f: load_body(f, mem_backend={"backend_type": 1, "backend_path": "m"}),
     "backend_type"),
    (lambda f: load_body(f, mem_backend={"backend_type": "File", "backend_path": "m",
                                         "x": 1}), "mem_backend must be"),
    (lambda f: load_body(f, mem_backend="File"), "mem_backend must be"),
    (lambda f: load_body(f, mem_backend=None), "mem_backend must be"),
    (lambda f: load_body(f, unknown=1), "unknown field 'unknown'"),
    (lambda f: load_body(f, snapshot_path=7), "snapshot_path"),
    (lambda f: load_body(f, snapshot_path=""), "snapshot_path"),
    (lambda f: load_body(f, snapshot_path="a\0b"), "snapshot_path"),
    (lambda f: {"mem_file_path": str(f / "no.mem")}, "snapshot_path"),
    (lambda f: load_body(f, resume_vm="yes"), "resume_vm must be true or false"),
    (lambda f: load_body(f, resume_vm=1), "resume_vm must be true or false"),
    (lambda f: load_body(f, track_dirty_pages=None), "track_dirty_pages"),
    (lambda f: load_body(f, enable_diff_snapshots="true"), "enable_diff_snapshots"),
    (lambda f: load_body(f, clock_realtime=0), "clock_realtime"),
    (lambda f: load_body(f, vsock_override={"path": "/x"}), "vsock_override must be"),
    (lambda f: load_body(f, huge_pages="2M"), "huge_pages '2M' is not supported yet"),
    (lambda f: load_body(f, huge_pages=2), "huge_pages"),
    (lambda f: load_body(f, network_overrides="eth0"), "network_overrides must be an array"),
    (lambda f: load_body(f, network_overrides=[{"iface_id": "eth0"}]), "network_overrides[0]"),
    (lambda f: load_body(f, network_overrides=["eth0"]), "network_overrides[0]"),
    (lambda f: load_body(f, network_overrides=[{"iface_id": "eth0", "host_dev_name": "tap0",
                                                "guest_mac": "06:00:00:00:00:01"}]),
     "network_overrides[0]"),
    (lambda f: load_body(f, network_overrides=[{"iface_id": 1, "host_dev_name": "tap0"}]),
     "iface_id"),
    (lambda f: load_body(f, network_overrides=[{"iface_id": "eth0", "host_dev_name": ""}]),
     "host_dev_name"),
    (lambda f: load_body(f, network_overrides=[
        {"iface_id": "eth0", "host_dev_name": "tap0"},
        {"iface_id": "eth0", "host_dev_name": "tap1"}]), "overridden twice"),
    (lambda f: [load_body(f)], "must be a JSON object"),
    (lambda f: "load", "must be a JSON object"),
    (lambda f: None, "must be a JSON object"),
]


def test_bad_load_bodies_are_400_and_the_process_stays_usable(snap_api):
    client, vm, files = snap_api
    config = client.payload("GET", "/vm/config", expect=200)
    for make, words in BAD_LOAD_BODIES:
        body = make(files)
        message = fault(client, "PUT", "/snapshot/load", body)
        assert words in message, (body, message)
        assert_usable_and_not_started(client, vm)
    # Raw bodies the JSON parser refuses.
    for raw, words in [(b'{"snapshot_path": "a", "snapshot_path": "b"}', "duplicate field"),
                       (b"{", "not valid JSON"), (b"", "Empty PUT request")]:
        status, payload = client.request("PUT", "/snapshot/load", raw=raw)
        assert status == 400 and words in payload["fault_message"], payload
    assert client.payload("GET", "/vm/config", expect=200) == config
    # The API is still all there: the VM can be configured and started.
    configure_boot(client, files)
    client.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    assert client.call("GET", "/")[1]["state"] == "Running"


@pytest.mark.parametrize("field_value", [
    ("network_overrides", {}), ("network_overrides", None), ("network_overrides", 0),
    ("network_overrides", False), ("network_overrides", ""), ("huge_pages", None)],
    ids=["no-overrides-object", "no-overrides-null", "no-overrides-0", "no-overrides-false",
         "no-overrides-empty-string", "huge-pages-null"])
def test_load_fields_of_the_wrong_type_are_refused_as_the_document_says(tmp_path,
                                                                        field_value):
    """openapi.json: network_overrides is an array, huge_pages a string (neither
    nullable); a falsy value of another type must not pass for "none given"."""
    name, value = field_value
    body = load_body(tmp_path, **{name: value})
    assert validate(body, request_schema("PUT", "/snapshot/load"))       # the document refuses
    with pytest.raises(SnapshotError) as err:
        LoadRequest.from_json(body)
    one_line(err.value, name)


@pytest.mark.kvm
def test_a_failed_load_leaves_the_microvm_as_it_was(tmp_path):
    """A snapshot whose state file and memory file pass every check but whose saved
    machine state is unusable: the load fails in the VM build.  The MicroVM must stay
    unconfigured (not take the snapshot's configuration), so that the next load is
    tried, not refused as if boot resources had been configured."""
    from pyvmm.kvm import Kvm
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF never loaded")
    with Kvm() as kvm:
        body = S.synthetic_body(kvm, kernel)
    write_state_file(tmp_path / "vm.state", body)
    S.sparse_file(tmp_path / "vm.mem", 16 * MiB)
    request = {"snapshot_path": str(tmp_path / "vm.state"),
               "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "vm.mem")}}
    vm, server = serve(tmp_path, request_timeout=1.0, idle_timeout=5.0)
    client = CheckedClient(server.path)
    try:
        config = client.payload("GET", "/vm/config", expect=200)
        fds = set(os.listdir("/proc/self/fd"))
        first = fault(client, "PUT", "/snapshot/load", request)
        assert "vcpus" in first, first
        assert set(os.listdir("/proc/self/fd")) <= fds          # nothing leaked
        assert_usable_and_not_started(client, vm)
        assert client.payload("GET", "/vm/config", expect=200) == config
        assert fault(client, "PUT", "/snapshot/load", request) == first
    finally:
        client.close()
        server.close()
        vm.close()


# -- hypothesis on the two routes' bodies ---------------------------------------------------

@pytest.fixture(scope="module")
def load_paths(tmp_path_factory) -> dict[str, str]:
    """Paths a fuzzed load may name; none of them makes a loadable snapshot."""
    d = tmp_path_factory.mktemp("loadpaths")
    (d / "vmlinux").write_bytes(b"\x7fELF never loaded")
    (d / "small.mem").write_bytes(bytes(PAGE))
    (d / "corrupt.state").write_bytes(VALID_FILE[:-3] + b"xyz")
    other = S.synthetic_body(None, d / "vmlinux")
    other["host"] = {"kvm": "hardware" if _host_kind() == "pvm" else "pvm",
                     "cpu_vendor": "GenuineIntel"}
    write_state_file(d / "other-host.state", other)
    here = S.synthetic_body(None, d / "vmlinux")
    here["host"] = _host_identity()
    write_state_file(d / "here.state", here)          # its memory file is never 16 MiB
    return {name: str(d / name) for name in
            ("small.mem", "corrupt.state", "other-host.state", "here.state", "missing",
             "vmlinux")} | {"dir": str(d)}


def _host_identity() -> dict:
    try:
        from pyvmm.kvm import Kvm
        from pyvmm.snapshot import host_identity
        with Kvm() as kvm:
            return host_identity(kvm)
    except Exception:  # noqa: BLE001 - without KVM, any host will do
        return {"kvm": "pvm", "cpu_vendor": "AuthenticAMD"}


def _host_kind() -> str:
    return _host_identity()["kvm"]


@st.composite
def load_bodies(draw, paths: dict[str, str]):
    """Bodies of PUT /snapshot/load: structured ones with fields of any type, and
    well-formed ones with a field or two changed or removed."""
    path = st.sampled_from(sorted(paths.values())) | st.sampled_from(["", "a\0b"]) | json_values
    if draw(st.booleans()):
        good_path = st.sampled_from(sorted(paths.values()))
        body = {"snapshot_path": draw(good_path)}
        if draw(st.booleans()):
            body["mem_backend"] = {"backend_type": draw(st.sampled_from(["File", "Uffd"])),
                                   "backend_path": draw(good_path)}
        else:
            body["mem_file_path"] = draw(good_path)
        for _ in range(draw(st.integers(0, 2))):
            name = draw(st.sampled_from(LoadRequest.FIELDS + ("unknown",)))
            value = draw(st.just(DELETE) | json_values)
            if value is DELETE:
                body.pop(name, None)
            else:
                body[name] = value
        return body
    flag = st.booleans() | json_values
    body = draw(st.fixed_dictionaries({}, optional={
        "snapshot_path": path, "mem_file_path": path,
        "mem_backend": st.fixed_dictionaries({}, optional={
            "backend_type": st.sampled_from(["File", "Uffd", "file", ""]) | json_values,
            "backend_path": path}) | json_values,
        "enable_diff_snapshots": flag, "track_dirty_pages": flag, "resume_vm": flag,
        "clock_realtime": flag,
        "network_overrides": st.lists(st.fixed_dictionaries(
            {"iface_id": st.sampled_from(["eth0", "eth1"]) | json_values,
             "host_dev_name": st.sampled_from(["tap0", "tap1"]) | json_values}),
            max_size=3) | json_values,
        "vsock_override": st.none() | json_values,
        "huge_pages": st.sampled_from(["Snapshot", "None", "2M"]) | json_values,
    }) | json_values | st.dictionaries(st.text(max_size=12), json_values, max_size=3))
    return body


create_bodies = st.fixed_dictionaries({}, optional={
    "snapshot_path": st.sampled_from(["/tmp/x.state", ""]) | json_values,
    "mem_file_path": st.sampled_from(["/tmp/x.mem", "a\0b"]) | json_values,
    "snapshot_type": st.sampled_from(["Full", "Diff", "full", None]) | json_values,
}) | json_values | st.dictionaries(st.text(max_size=12), json_values, max_size=3)


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    """An unconfigured MicroVM's API, for every load example."""
    d = tmp_path_factory.mktemp("loadapi")
    vm, server = serve(d, request_timeout=2.0)
    client = CheckedClient(server.path)
    yield client, vm
    client.close()
    server.close()
    vm.close()


@pytest.fixture(scope="module")
def running_server(tmp_path_factory):
    """A running (stand-in) MicroVM's API, for every create example."""
    d = write_api_files(tmp_path_factory.mktemp("createapi"))
    vm, server = serve(d, request_timeout=2.0)
    vm.vm_factory = S.SnapshottingFakeVm
    client = CheckedClient(server.path)
    configure_boot(client, d)
    client.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    yield client, vm, FakeLinuxVm.instances[-1]
    client.close()
    server.close()
    vm.close()


@FUZZ
@given(data=st.data())
def test_fuzzed_load_bodies_are_always_400_and_the_server_lives(load_server, load_paths,
                                                                data):
    client, vm = load_server
    body = data.draw(load_bodies(load_paths))
    status, payload = send(client, "PUT", "/snapshot/load", body)
    assert status == 400, (body, payload)
    assert "\n" not in payload["fault_message"]
    assert client.call("GET", "/")[0] == 200
    assert vm.state == "Not started" and vm.spec.boot_source is None


@FUZZ
@given(body=create_bodies)
def test_fuzzed_create_bodies_are_always_400_on_a_running_vm(running_server, body):
    client, vm, fake = running_server
    status, payload = send(client, "PUT", "/snapshot/create", body)
    assert status == 400, (body, payload)
    try:
        parse_create(body)
    except SnapshotError as exc:
        assert payload["fault_message"] == one_line(exc)
    else:
        assert payload["fault_message"] == NOT_PAUSED
    assert client.call("GET", "/")[1]["state"] == "Running"
    assert not [c for c in fake.calls if isinstance(c, tuple)]


@FUZZ
@given(data=st.data())
def test_what_the_parsers_accept_the_document_describes(load_paths, data):
    """LoadRequest.from_json and parse_create accept no body that openapi.json refuses
    (they may refuse more: exactly one memory backend, no NUL in paths...)."""
    body = data.draw(load_bodies(load_paths))
    try:
        LoadRequest.from_json(body)
    except SnapshotError as exc:
        one_line(exc)
    else:
        assert not validate(body, request_schema("PUT", "/snapshot/load")), body
    body = data.draw(create_bodies)
    try:
        parse_create(body)
    except SnapshotError as exc:
        one_line(exc)
    else:
        assert not validate(body, request_schema("PUT", "/snapshot/create")), body


# == 5. open_snapshot's refusals ================================================================

@pytest.fixture
def synthetic(tmp_path):
    """(kvm, body, write): a synthetic body this host accepts (16 MiB, a drive and a
    NIC), and write(body) -> a LoadRequest for it with a 16 MiB memory file."""
    from pyvmm.kvm import Kvm
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF never loaded")
    (tmp_path / "data.img").write_bytes(bytes(MiB))
    kvm = Kvm()
    body = S.synthetic_body(kvm, kernel, drives=[{
        "drive_id": "data", "path_on_host": str(tmp_path / "data.img"),
        "is_root_device": False, "is_read_only": True}],
        nets=[{"iface_id": "eth0", "host_dev_name": "tap0"}])
    mem = S.sparse_file(tmp_path / "vm.mem", 16 * MiB)

    def write(body: dict, **request) -> LoadRequest:
        write_state_file(tmp_path / "vm.state", body)
        return LoadRequest(str(tmp_path / "vm.state"), str(mem), **request)
    yield kvm, body, write
    kvm.close()


def refused_open(request: LoadRequest, kvm, *words: str) -> str:
    with pytest.raises(SnapshotError) as err:
        open_snapshot(request, kvm).close()
    return one_line(err.value, *words)


@pytest.mark.kvm
def test_open_snapshot_takes_a_synthetic_snapshot(synthetic, tmp_path):
    kvm, body, write = synthetic
    opened = open_snapshot(write(body, track_dirty_pages=True,
                                 network_overrides={"eth0": "tap7"},
                                 drive_overrides={"data": str(tmp_path / "copy.img")}), kvm)
    try:
        assert opened.memory.size == 16 * MiB and opened.memory.backend == "file"
        spec = opened.spec
        assert spec.machine_config.mem_size_mib == 16 and spec.machine_config.track_dirty_pages
        assert spec.network_interfaces["eth0"].host_dev_name == "tap7"
        assert spec.drives["data"].path_on_host == str(tmp_path / "copy.img")
    finally:
        opened.close()


@pytest.mark.kvm
@pytest.mark.parametrize("size", [0, 16 * MiB - PAGE, 16 * MiB + 1, 32 * MiB])
def test_open_snapshot_refuses_a_memory_file_of_another_size(synthetic, tmp_path, size):
    kvm, body, write = synthetic
    request = write(body)
    S.sparse_file(tmp_path / "vm.mem", size)
    refused_open(request, kvm, str(tmp_path / "vm.mem"), f"is {size} bytes",
                 f"has {16 * MiB}")


@pytest.mark.kvm
def test_open_snapshot_refuses_another_kind_of_host(synthetic):
    kvm, body, write = synthetic
    here = body["host"]["kvm"]
    other = "hardware" if here == "pvm" else "pvm"
    refused_open(write({**body, "host": {**body["host"], "kvm": other}}), kvm,
                 f"taken on a {other} KVM host", f"this is a {here} KVM host")


@pytest.mark.kvm
@pytest.mark.parametrize("host", [None, {}, "pvm", {"cpu_vendor": "GenuineIntel"}],
                         ids=["null", "empty", "text", "no-kind"])
def test_open_snapshot_refuses_an_unknown_host(synthetic, host):
    kvm, body, write = synthetic
    message = refused_open(write({**body, "host": host}), kvm, "KVM host")
    assert "an unknown KVM host" in message and "a an " not in message, message


@pytest.mark.kvm
def test_open_snapshot_refuses_another_cpu_vendor(synthetic):
    kvm, body, write = synthetic
    here = body["host"]["cpu_vendor"]
    other = "GenuineIntel" if here != "GenuineIntel" else "AuthenticAMD"
    refused_open(write({**body, "host": {**body["host"], "cpu_vendor": other}}), kvm,
                 other, here)


@pytest.mark.kvm
@pytest.mark.parametrize("regions", [[[0, 32 * MiB]], [[0, 8 * MiB], [8 * MiB, 8 * MiB]],
                                     [], None, "all", [[0, "16M"]]])
def test_open_snapshot_refuses_regions_that_do_not_match_the_configuration(synthetic,
                                                                           regions):
    kvm, body, write = synthetic
    memory = {**body["memory"], "regions": regions}
    refused_open(write({**body, "memory": memory}), kvm, "memory regions do not match")
    refused_open(write({**body, "memory": None}), kvm, "memory regions do not match")


@pytest.mark.kvm
def test_open_snapshot_refuses_overrides_of_devices_it_does_not_have(synthetic):
    kvm, body, write = synthetic
    refused_open(write(body, network_overrides={"eth9": "tap9"}), kvm,
                 "network interface 'eth9'", "it has: eth0")
    refused_open(write(body, drive_overrides={"rootfs": "/tmp/x.img"}), kvm,
                 "no drive 'rootfs'", "it has: data")


@pytest.mark.kvm
def test_open_snapshot_refuses_a_corrupt_configuration_or_type(synthetic, tmp_path):
    kvm, body, write = synthetic
    refused_open(write({**body, "snapshot_type": "Incremental"}), kvm, "unknown snapshot type")
    refused_open(write({**body, "vm_spec": None}), kvm, "no configuration")
    spec = copy.deepcopy(body["vm_spec"])
    spec["boot-source"]["kernel_image_path"] = str(tmp_path / "gone")
    refused_open(write({**body, "vm_spec": spec}), kvm, "gone")
    spec = copy.deepcopy(body["vm_spec"])
    spec["machine-config"]["mem_size_mib"] = "16"
    refused_open(write({**body, "vm_spec": spec}), kvm, "mem_size_mib")


# == 6. merge() ===============================================================================

LAYOUT = [(0, 1 * MiB), (4 << 30, 2 * MiB)]
PAGES = [size // PAGE for _, size in LAYOUT]
TOTAL_PAGES = sum(PAGES)


def _pages(seed: int) -> bytes:
    """Each page's bytes name the page and the seed."""
    return b"".join(struct.pack("<II", seed, page) * (PAGE // 8) for page in range(TOTAL_PAGES))


def _diff_snapshot(directory: Path, marked: set[int]) -> tuple[Path, Path, int]:
    """A Diff snapshot (state file, memory file) of guest RAM holding _pages(2), with
    the pages in `marked` (indices over both regions) dirty; returns its paths and
    the bytes write_diff wrote."""
    from pyvmm.memory import GuestMemory
    memory = GuestMemory(LAYOUT)
    try:
        content = _pages(2)
        offset = 0
        for region in memory.regions:
            region.mm[:] = content[offset:offset + region.size]
            offset += region.size
        bitmaps, first = [], 0
        for count in PAGES:
            bitmap = bytearray(((count + 63) // 64) * 8)
            for page in marked:
                if first <= page < first + count:
                    bitmap[(page - first) // 8] |= 1 << ((page - first) % 8)
            bitmaps.append(bitmap)
            first += count
        diff_mem = directory / "diff.mem"
        written = memfile.write_diff(memory, diff_mem, bitmaps)
    finally:
        memory.close()
    state = directory / "diff.state"
    write_state_file(state, {"snapshot_type": "Diff", "memory": {
        "regions": [list(r) for r in LAYOUT], "page_size": PAGE,
        "dirty_pages": memfile.encode_bitmaps(bitmaps)}})
    return state, diff_mem, written


@settings(max_examples=max(10, EXAMPLES // 10), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(marked=st.sets(st.integers(0, TOTAL_PAGES - 1), max_size=48))
@example(marked=set())
@example(marked={0, PAGES[0] - 1, PAGES[0], TOTAL_PAGES - 1})
@example(marked=set(range(PAGES[0] - 9, PAGES[0] + 9)))
def test_merge_copies_exactly_the_marked_pages(fuzz_dir, marked):
    state, diff_mem, written = _diff_snapshot(fuzz_dir, marked)
    assert written == len(marked) * PAGE
    base = fuzz_dir / "base.mem"
    base.write_bytes(_pages(1))
    assert merge(base, state, diff_mem) == len(marked) * PAGE
    merged, old, new = base.read_bytes(), _pages(1), _pages(2)
    assert len(merged) == TOTAL_PAGES * PAGE
    for page in range(TOTAL_PAGES):
        want = new if page in marked else old
        assert merged[page * PAGE:(page + 1) * PAGE] == want[page * PAGE:(page + 1) * PAGE], \
            page


def test_merge_refuses_a_full_snapshot(tmp_path):
    state = tmp_path / "full.state"
    write_state_file(state, {"snapshot_type": "Full", "memory": {
        "regions": [list(r) for r in LAYOUT], "dirty_pages": None}})
    base = tmp_path / "base.mem"
    base.write_bytes(_pages(1))
    with pytest.raises(SnapshotError) as err:
        merge(base, state, tmp_path / "full.mem")
    one_line(err.value, "Full snapshot, not a Diff")
    assert base.read_bytes() == _pages(1)


def test_merge_refuses_a_base_or_diff_of_the_wrong_size(tmp_path):
    state, diff_mem, _ = _diff_snapshot(tmp_path, {1, 2, 3})
    base = tmp_path / "base.mem"
    base.write_bytes(_pages(1)[:-PAGE])
    with pytest.raises(SnapshotError) as err:
        merge(base, state, diff_mem)
    one_line(err.value, str(base), f"is {TOTAL_PAGES * PAGE - PAGE} bytes",
             f"has {TOTAL_PAGES * PAGE}")
    assert base.read_bytes() == _pages(1)[:-PAGE]
    base.write_bytes(_pages(1))
    with open(diff_mem, "r+b") as f:
        f.truncate(PAGE)
    with pytest.raises(SnapshotError) as err:
        merge(base, state, diff_mem)
    one_line(err.value, str(diff_mem), f"is {PAGE} bytes")
    assert base.read_bytes() == _pages(1)
    with pytest.raises(SnapshotError) as err:
        merge(tmp_path / "missing.mem", state, S.sparse_file(diff_mem, TOTAL_PAGES * PAGE))
    one_line(err.value, "missing.mem")


@pytest.mark.parametrize("memory, words", [
    ({"regions": [list(r) for r in LAYOUT], "dirty_pages": None}, "does not match"),
    ({"regions": [list(r) for r in LAYOUT], "dirty_pages": ["AAAA"]}, "does not match"),
    ({"regions": [list(r) for r in LAYOUT], "dirty_pages": ["!!", "!!"]}, "not base64"),
    ({"regions": [list(r) for r in LAYOUT], "dirty_pages": [7, 7]}, "not base64"),
    ({"regions": [list(r) for r in LAYOUT], "dirty_pages": ["AAAA", "AAAA"]}, "wrong size"),
    ({"regions": [list(r) for r in LAYOUT],
      "dirty_pages": [base64.b64encode(bytes(4096)).decode()] * 2}, "wrong size"),
    ({"regions": [[0, -1]], "dirty_pages": []}, "bad memory regions"),
    ({"regions": [[0, True]], "dirty_pages": []}, "bad memory regions"),
    ({"regions": "all", "dirty_pages": []}, "bad memory regions"),
    (None, "bad memory regions"),
], ids=["null-bitmaps", "one-bitmap", "garbage", "numbers", "short", "long", "negative",
        "bool", "text", "no-memory"])
def test_merge_refuses_a_corrupt_diff_record(tmp_path, memory, words):
    state = tmp_path / "diff.state"
    write_state_file(state, {"snapshot_type": "Diff", "memory": memory})
    base = S.sparse_file(tmp_path / "base.mem", TOTAL_PAGES * PAGE)
    diff = S.sparse_file(tmp_path / "diff.mem", TOTAL_PAGES * PAGE)
    with pytest.raises(SnapshotError) as err:
        merge(base, state, diff)
    one_line(err.value, words)


# == 7. The CLI =================================================================================

def pyvmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def cli_refused(result: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed with one line `pyvmm: error: ...` on stderr, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_cli_snapshot_info_prints_the_fields(tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF never loaded")
    body = S.synthetic_body(None, kernel, mem_mib=4096, vcpus=2)
    body["kvm"]["vcpus"] = [{"index": 0}, "garbage"]
    body["devices"]["virtio"] = {"drive:rootfs": {}, "net:eth0": {}}
    (tmp_path / "snap").mkdir()
    write_state_file(tmp_path / "snap" / "vm.state", body)
    for target in (tmp_path / "snap" / "vm.state", tmp_path / "snap"):
        result = pyvmm("snapshot", "info", str(target))
        assert result.returncode == 0 and not result.stderr, result
        out = result.stdout
        assert f"pyvmm snapshot, format version {FORMAT_VERSION}" in out
        assert "type:        Full" in out
        assert f"taken on:    pvm KVM, AuthenticAMD, pyvmm {body['pyvmm_version']}" in out
        assert "created:     20" in out
        assert "memory:      4096 MiB in 2 region(s): 0x0+3072 MiB, 0x100000000+1024 MiB" \
            in out, out
        assert f"kernel:      {kernel}" in out
        assert "vCPUs:       2" in out and out.count("(unreadable vCPU") == 2
        assert "devices:     serial, i8042, drive:rootfs, net:eth0" in out


@pytest.mark.parametrize("damage", ["flip", "truncate", "memory-file", "missing"])
def test_cli_snapshot_info_on_a_bad_file_is_one_line(tmp_path, damage):
    path = tmp_path / "vm.state"
    write_state_file(path, BODY)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x20
        path.write_bytes(data)
    elif damage == "truncate":
        path.write_bytes(data[:30])
    elif damage == "memory-file":
        path.write_bytes(bytes(64 * PAGE))
    else:
        path.unlink()
    cli_refused(pyvmm("snapshot", "info", str(path)), str(path))


def test_cli_run_restore_refuses_vm_flags(tmp_path):
    cli_refused(pyvmm("run", "--restore", str(tmp_path), "--cpus", "2"),
                "--cpus cannot be combined with restoring a snapshot")
    cli_refused(pyvmm("run", "--snapshot", str(tmp_path / "vm.state"), "--snapshot-mem",
                      str(tmp_path / "vm.mem"), "--mem", "512"), "--mem cannot be combined")


def test_cli_run_paused_needs_an_api_socket(tmp_path):
    cli_refused(pyvmm("run", "--restore", str(tmp_path), "--paused"),
                "--paused needs --api-sock")


def test_cli_run_snapshot_needs_its_memory_file(tmp_path):
    cli_refused(pyvmm("run", "--snapshot", str(tmp_path / "vm.state")),
                "--snapshot needs --snapshot-mem")
    cli_refused(pyvmm("run", "--snapshot-mem", str(tmp_path / "vm.mem")),
                "--snapshot-mem needs --restore DIR or --snapshot FILE")
    cli_refused(pyvmm("run", "--restore", str(tmp_path), "--snapshot", str(tmp_path / "s")),
                "not both")


def test_cli_run_restore_of_a_missing_snapshot_is_one_line(tmp_path):
    cli_refused(pyvmm("run", "--restore", str(tmp_path / "nowhere"), "--console", "none"))


def test_cli_snapshot_merge_refusal_is_one_line(tmp_path):
    state = tmp_path / "full.state"
    write_state_file(state, {"snapshot_type": "Full", "memory": {}})
    cli_refused(pyvmm("snapshot", "merge", str(tmp_path / "base.mem"), str(state),
                      str(tmp_path / "diff.mem")), "not a Diff")

"""MMDS against a real Linux guest booted by pyvmm: the guest reads its metadata
over HTTP at 169.254.169.254 with busybox (wget, and nc for V2's token PUT), the
host changes it while the guest runs, and a sniffer on the TAP devices proves that
none of that traffic left virtio-net.

Two guests (a Linux boot takes about a minute on KVM PVM hosts):
- V1, configured from Python (MicroVM(mmds=..., mmds_config=...)), later
  snapshotted and restored: the restored VM keeps MMDS's configuration and not its
  data, as in Firecracker, and takes new data through the store;
- V2, configured by a third-party Firecracker client (PyPI firecracker-python,
  unchanged) through `pyvmm api` in the call order it uses, with an `Async`
  (io_uring) drive the guest writes and the host reads back.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.framework.api import firecracker_python_api
from tests.framework.microvm import run_in_shell
from tests.framework.netns import GUEST_IP, HOST_IP
from tests.framework.process import Process, pyvmm_command

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MMDS_IP = "169.254.169.254"
MAC = "06:00:ac:1e:00:12"
SECOND_TAP = "tap1"
SECOND_GUEST_IP = "172.30.0.3"
METADATA = {"latest": {"meta-data": {"instance-id": "i-0123456789",
                                     "local-hostname": "pyvmm-guest",
                                     "tags": {"role": "test", "owner": "ci"}},
                       "user-data": "#!/bin/sh\necho hello\n"}}
# wget prints the body only.  No -T: busybox wget's -T crashes (SIGSEGV) in this guest
# whatever the server (the host's too); the shell's own timeout bounds each command.
WGET = "wget -q -O -"
GUEST_NET = ("dmesg -n 1 && ip addr add {ip}/24 dev eth0 && ip link set eth0 up && "
             f"ip route add {MMDS_IP} dev eth0")

# On the TAP side: every frame that names the MMDS address (ARP or IPv4, either
# way) is printed.  None may appear: pyvmm answers them inside virtio-net.
SNIFFER = r"""
import select, socket, sys
socks = []
for tap in sys.argv[1:]:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))   # ETH_P_ALL
    s.bind((tap, 0))
    socks.append(s)
print("READY", flush=True)
mmds = socket.inet_aton("169.254.169.254")
while True:
    for s in select.select(socks, [], [])[0]:
        frame = s.recv(65536)
        if mmds in frame:
            print("MMDS", frame[:64].hex(), flush=True)
"""


def read_lines(proc: subprocess.Popen, timeout: float = 5) -> list[str]:
    proc.terminate()
    out, _ = proc.communicate(timeout=timeout)
    return out.splitlines()


@pytest.fixture(scope="module")
def taps(netns):
    """tap0 (the module's namespace's) and a second TAP beside it for the second VM."""
    netns.run("ip", "tuntap", "add", SECOND_TAP, "mode", "tap", check=True)
    netns.run("ip", "link", "set", SECOND_TAP, "up", check=True)
    return netns.tap, SECOND_TAP


@pytest.fixture(scope="module")
def sniffer(netns, taps):
    proc = netns.python(SNIFFER, *taps, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def v1_vm(guest, netns, taps, sniffer, module_microvm_factory):
    vm = module_microvm_factory.boot(
        mem_mib=256, nets=[{"iface_id": "eth0", "host_dev_name": taps[0], "guest_mac": MAC}],
        netns=netns, mmds=METADATA,
        mmds_config={"version": "V1", "network_interfaces": ["eth0"]})
    run_in_shell(vm, GUEST_NET.format(ip=GUEST_IP))
    return vm


def wget(vm, path: str, *headers: str, timeout: float = 120) -> tuple[str, int]:
    """GET path from MMDS in the guest: (body, wget's exit status)."""
    options = " ".join(f"--header '{h}'" for h in headers)
    out = run_in_shell(vm, f"{WGET} {options} http://{MMDS_IP}{path} 2>&1; r=$?; echo; "
                           "echo WGET-RC=$r", timeout=timeout)
    body, _, rc = out.rpartition("WGET-RC=")
    return body.replace("\r\n", "\n").strip(), int(rc.split()[0])     # the tty's CRLF


def test_v1_the_guest_reads_values_listings_and_json(v1_vm):
    assert wget(v1_vm, "/latest/meta-data/instance-id") == ("i-0123456789", 0)
    listing, rc = wget(v1_vm, "/latest/meta-data/")
    assert rc == 0 and listing.split() == ["instance-id", "local-hostname", "tags/"], listing
    body, rc = wget(v1_vm, "/latest/meta-data", "Accept: application/json")
    assert rc == 0 and json.loads(body) == METADATA["latest"]["meta-data"], body
    assert wget(v1_vm, "/latest/user-data")[0] == "#!/bin/sh\necho hello"


def test_v1_a_patch_from_the_host_is_what_the_guest_reads_next(v1_vm):
    v1_vm.mmds.patch({"latest": {"meta-data": {"instance-id": "i-patched",
                                               "tags": {"owner": None}}}})
    assert wget(v1_vm, "/latest/meta-data/instance-id") == ("i-patched", 0)
    assert wget(v1_vm, "/latest/meta-data/tags/")[0].split() == ["role"]
    body, rc = wget(v1_vm, "/latest/meta-data/nothing-here")
    assert rc != 0 and "404" in body, body


def test_v1_many_clients_at_once_and_the_nic_still_carries_other_traffic(v1_vm, netns):
    # 16 wgets at once: more connections than the guest usually opens, each answered.
    out = run_in_shell(v1_vm, "for i in $(seq 16); do "
                              f"({WGET} http://{MMDS_IP}/latest/meta-data/instance-id > /tmp/m$i"
                              " 2>&1; echo \" rc=$?\" >> /tmp/m$i) < /dev/null & done; wait; cat /tmp/m*",
                       timeout=300)
    assert out.count("i-patched rc=0") == 16, out
    host = netns.run("ping", "-c", "2", "-W", "5", GUEST_IP, capture_output=True, text=True)
    assert host.returncode == 0, host.stdout + host.stderr
    stats = v1_vm.stats["virtio"]["net:eth0"]
    assert stats["error"] is None, stats


def test_v1_a_huge_request_line_is_refused_and_the_service_carries_on(v1_vm):
    # 100 kB of request line: past the 2500 bytes a connection may buffer.  The guest
    # gets a 413 and the connection is closed (its TCP may see the close as a reset
    # while it is still sending); the next request is answered as usual.
    out = run_in_shell(v1_vm, "(printf 'GET /'; head -c 100000 /dev/zero | tr '\\0' a; "
                              f"printf ' HTTP/1.1\\r\\n\\r\\n') | nc -w 5 {MMDS_IP} 80 "
                              "| head -n 1", timeout=300)
    assert "200" not in out, out
    assert out.strip() == "" or "413" in out, out
    assert wget(v1_vm, "/latest/meta-data/instance-id") == ("i-patched", 0)
    stack = v1_vm.stats["virtio"]["net:eth0"]
    assert stack["error"] is None, stack


def test_v1_a_restored_vm_keeps_the_mmds_config_but_not_the_data(v1_vm, netns, taps,
                                                                  module_microvm_factory,
                                                                  tmp_path_factory):
    d = tmp_path_factory.mktemp("mmds-snapshot")
    v1_vm.pause()
    v1_vm.snapshot(d / "vm.state", d / "vm.mem")
    assert v1_vm.config_json()["mmds-config"]["version"] == "V1"
    v1_vm.close()                      # the TAP is free for the restored VM
    vm = module_microvm_factory.restore(d / "vm.state", d / "vm.mem", netns=netns)
    assert vm.spec.mmds_config is not None and vm.spec.mmds_config.version == "V1"
    assert vm.mmds.get() in (None, {})           # the data is not in a snapshot
    body, rc = wget(vm, "/latest/meta-data/instance-id")
    assert rc != 0 and "i-patched" not in body, body
    vm.mmds.put({"latest": {"meta-data": {"instance-id": "i-restored"}}})
    assert wget(vm, "/latest/meta-data/instance-id") == ("i-restored", 0)


# -- V2, configured by a Firecracker client through `pyvmm api` ------------------------------

TOKEN_REQUEST = ("printf 'PUT /latest/api/token HTTP/1.1\\r\\nHost: {ip}\\r\\n{header}: {ttl}"
                 "\\r\\nConnection: close\\r\\n\\r\\n' | nc -w 5 {ip} 80")


@pytest.fixture(scope="module")
def v2_api_vm(guest, netns, taps, sniffer, tmp_path_factory):
    """`pyvmm api`, configured by firecracker-python's Api in the order its MicroVM.create
    makes the calls (boot source, drive, machine, network, MMDS config, MMDS data,
    InstanceStart), with io_engine "Async" on the drive."""
    fc = firecracker_python_api()
    d = tmp_path_factory.mktemp("mmds-api")
    sock, image = d / "fc.sock", d / "data.img"
    image.write_bytes(bytes(1 << 20))
    proc = Process(netns.wrap(pyvmm_command() + ["api", "--api-sock", str(sock)]))
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline and proc.proc.poll() is None, proc.stderr()
            time.sleep(0.05)
        api = fc.Api(str(sock))
        api.boot.put(kernel_image_path=str(guest.vmlinux),
                      initrd_path=str(guest.initramfs),
                      boot_args="console=ttyS0 reboot=k panic=-1 pci=off")
        api.drive.put(drive_id="data", path_on_host=str(image), is_root_device=False,
                      is_read_only=False, io_engine="Async")
        api.machine_config.put(vcpu_count=1, mem_size_mib=256)
        api.network.put(iface_id="eth0", host_dev_name=taps[1])
        api.mmds_config.put(version="V2", ipv4_address=MMDS_IP, network_interfaces=["eth0"])
        api.mmds.put(**METADATA)
        api.actions.put(action_type="InstanceStart")
        proc.serial.expect(rb"PYVMM-INIT-OK", timeout=900)
        run_in_shell(proc, GUEST_NET.format(ip=SECOND_GUEST_IP))
        yield {"proc": proc, "api": api, "image": image, "fc": fc}
    finally:
        proc.kill()


def token(vm, header: str = "X-metadata-token-ttl-seconds", ttl: str = "60") -> str:
    out = run_in_shell(vm, TOKEN_REQUEST.format(ip=MMDS_IP, header=header, ttl=ttl))
    return out.strip().splitlines()[-1] if out.strip() else ""


def test_v2_needs_a_session_token_and_accepts_both_spellings(v2_api_vm):
    vm = v2_api_vm["proc"]
    body, rc = wget(vm, "/latest/meta-data/instance-id")
    assert rc != 0 and "401" in body, body
    session = token(vm)
    assert len(session) >= 20 and " " not in session, session
    assert wget(vm, "/latest/meta-data/instance-id",
                f"X-metadata-token: {session}") == ("i-0123456789", 0)
    aws = token(vm, "X-aws-ec2-metadata-token-ttl-seconds", "30")
    assert wget(vm, "/latest/meta-data/local-hostname",
                f"X-aws-ec2-metadata-token: {aws}") == ("pyvmm-guest", 0)
    body, rc = wget(vm, "/latest/meta-data/instance-id", "X-metadata-token: not-a-token")
    assert rc != 0 and "401" in body, body


def test_v2_a_bad_ttl_is_refused_and_the_service_carries_on(v2_api_vm):
    vm = v2_api_vm["proc"]
    out = run_in_shell(vm, TOKEN_REQUEST.format(ip=MMDS_IP, header="X-metadata-token-ttl-seconds",
                                                ttl="0"))
    assert "400" in out.splitlines()[0], out
    session = token(vm)
    assert wget(vm, "/latest/meta-data/instance-id", f"X-metadata-token: {session}")[1] == 0


def test_v2_the_clients_patch_reaches_the_guest(v2_api_vm):
    api, vm = v2_api_vm["api"], v2_api_vm["proc"]
    api.mmds.patch(latest={"meta-data": {"instance-id": "i-from-the-client"}})
    assert api.mmds.get().json()["latest"]["meta-data"]["instance-id"] == "i-from-the-client"
    session = token(vm)
    assert wget(vm, "/latest/meta-data/instance-id",
                f"X-metadata-token: {session}") == ("i-from-the-client", 0)


def test_the_async_drive_takes_the_guests_writes(v2_api_vm):
    vm, image = v2_api_vm["proc"], v2_api_vm["image"]
    payload = os.urandom(48).hex()                 # 96 characters, then a newline
    out = run_in_shell(vm, f"echo {payload} | dd of=/dev/vda bs=512 seek=8 conv=sync,fsync "
                           "2>&1; dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 96",
                       timeout=300)
    assert payload in out, out
    with open(image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(97) == f"{payload}\n".encode()
    config = v2_api_vm["api"].vm_config.get().json()
    assert config["drives"][0]["io_engine"] == "Async", config["drives"]


def test_the_tap_saw_none_of_the_mmds_traffic(v1_vm, v2_api_vm, sniffer, netns):
    # Last: after both guests have talked to MMDS.  The sniffer has seen every frame
    # on both TAPs since before either guest booted.
    lines = read_lines(sniffer)
    assert not [line for line in lines if line.startswith("MMDS")], lines[:5]

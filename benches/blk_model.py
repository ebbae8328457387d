"""blk-model: requests/s through pyvmm's virtio-blk queue code, no guest, no KVM.

A host thread plays the driver (pyvmm.devices.virtio.driver.HostDriver) on a
64 MiB GuestMemory: the descriptor chains (16-byte header, one data buffer,
status byte) are written once; each round rewrites the headers' sectors,
publishes `batch` chains on the avail ring, then calls the transport's
notify, which is what the I/O thread runs when the guest kicks: pop each
chain, parse and bounds-check it, preadv/pwritev between the file and guest
RAM, push the used element, signal (a no-op counter here).  Only the notify
call is timed, so the driver's own Python is not counted.

Baseline: benches/blk_bare.c, a C loop of pread/pwrite of the same size at the
same offsets on the same file (in the host page cache, like pyvmm's buffered
I/O), and for reference the same loop in Python (os.preadv/os.pwritev into
a memoryview).  Ratio = pyvmm requests/s / bare C requests/s, same repetition.

pyvmm-async-bN: the same with io_engine "Async" (io_uring): the timed part is the
kick (submission) and the completions (waiting on the ring's eventfd, then
engine_ready(), which the I/O thread runs), so a request is counted once it is
back on the used ring.  Async/Sync compares the same batch, same repetition.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import time
from typing import Any

from benches import blk, harness
from benches.harness import Stats
from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.blk import Block, T_IN, T_OUT
from pyvmm.devices.virtio.driver import HostDriver
from pyvmm.memory import GuestMemory, MiB

SIZES = ((4096, 20000), (1 << 20, 400))          # request size, requests per run
OPS = ("read", "write")
BATCHES = (1, 32)                                # chains per notify
MEM = 64 * MiB
IMAGE_MIB = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("blk-model")
    group.add_argument("--model-scale", type=float, default=1.0,
                       help="multiply the request counts (default 1: 20000 x 4 KiB, 400 x 1 MiB)")


class _Irq:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def run_model(path, op: str, size: int, count: int, batch: int,
              io_engine: str = "Sync") -> float:
    """Seconds spent in notify() (and, for Async, serving completions) for `count`
    requests."""
    memory = GuestMemory([(0, MEM)])
    device = Block(path, io_engine=io_engine)
    try:
        transport = mmio.VirtioMmio(device, memory, _Irq())
        driver = HostDriver(transport, memory, queue_size=256)
        driver.setup()
        base = driver.data
        headers, statuses = base, base + 0x1000
        data = base + 0x2000
        slots = device.disk.size // size
        for j in range(batch):
            d = 3 * j
            driver.write_desc(d, headers + 16 * j, 16, 1, d + 1)      # NEXT
            driver.write_desc(d + 1, data + (j * size if size <= 65536 else 0), size,
                              (2 if op == "read" else 0) | 1, d + 2)
            driver.write_desc(d + 2, statuses + j, 1, 2, 0)
        rtype = T_IN if op == "read" else T_OUT
        sectors = size // 512
        elapsed = 0.0
        done = 0
        while done < count:
            n = min(batch, count - done)
            for j in range(n):
                memory.write(headers + 16 * j, (rtype.to_bytes(4, "little") + bytes(4) +
                                                (((done + j) % slots) * sectors)
                                                .to_bytes(8, "little")))
                driver.publish(3 * j)
            t0 = time.perf_counter()
            driver.kick()
            engine = device.engine
            while engine is not None and engine.in_flight:
                select.select([engine.eventfd], [], [], 10)
                engine.clear_eventfd()
                device.engine_ready()
            elapsed += time.perf_counter() - t0
            used = driver.used()
            if len(used) != n or any(memory.read(statuses + j, 1) != b"\0" for j in range(n)):
                raise RuntimeError(f"blk-model: {len(used)}/{n} used, status "
                                   f"{memory.read(statuses, n).hex()}, error {transport.error}")
            done += n
        return elapsed
    finally:
        device.close()
        memory.close()


def run_python(path, op: str, size: int, count: int) -> float:
    fd = os.open(path, os.O_RDWR)
    buf = memoryview(bytearray(size))
    slots = os.fstat(fd).st_size // size
    t0 = time.perf_counter()
    for i in range(count):
        if op == "read":
            os.preadv(fd, [buf], (i % slots) * size)
        else:
            os.pwritev(fd, [buf], (i % slots) * size)
    t = time.perf_counter() - t0
    os.close(fd)
    return t


def run_bare(binary, path, op: str, size: int, count: int) -> float:
    out = subprocess.run([str(binary), str(path), op, str(size), str(count)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["ns"] / 1e9


def main(args: argparse.Namespace) -> dict[str, Any]:
    binary = harness.compile_c(harness.BENCHES_DIR / "blk_bare.c")
    path = blk.disk_image(IMAGE_MIB)
    with open(path, "rb") as f:                     # into the page cache
        while f.read(1 << 20):
            pass
    facts = harness.machine_facts()
    reps = args.reps
    print(f"{harness.format_facts(facts)}\n{reps} repetitions; image {path} (page cache)",
          flush=True)
    variants = ["bare-c", "python"] + [f"pyvmm-b{b}" for b in BATCHES] + \
        [f"pyvmm-async-b{b}" for b in BATCHES]
    samples: dict[str, dict[str, list[float]]] = {}
    for size, count in SIZES:
        count = max(10, int(count * args.model_scale))
        for op in OPS:
            key = f"{op}-{size // 1024}K"
            samples[key] = {v: [] for v in variants}
            for rep in range(reps):
                for v in harness.rotated(variants, rep):
                    if v == "bare-c":
                        t = run_bare(binary, path, op, size, count)
                    elif v == "python":
                        t = run_python(path, op, size, count)
                    elif v.startswith("pyvmm-async-b"):
                        t = run_model(path, op, size, count, int(v[len("pyvmm-async-b"):]),
                                      io_engine="Async")
                    else:
                        t = run_model(path, op, size, count, int(v[len("pyvmm-b"):]))
                    samples[key][v].append(count / t)
    summary: dict[str, Any] = {}
    rows = []
    for key, per in samples.items():
        entry = {v: Stats.of(per[v]) for v in variants}
        for v in variants[1:]:
            entry[f"{v}_ratio"] = Stats.of([a / b for a, b in zip(per[v], per["bare-c"])])
        for b in BATCHES:               # Async over Sync, same batch, same repetition
            entry[f"async_over_sync_b{b}"] = Stats.of(
                [a / s for a, s in zip(per[f"pyvmm-async-b{b}"], per[f"pyvmm-b{b}"])])
        summary[key] = entry
        rows.append([key] + [entry[v].format(".0f") for v in variants] +
                    [entry[f"{v}_ratio"].format(".3f") for v in variants[2:4]] +
                    [entry[f"async_over_sync_b{b}"].format(".2f") for b in BATCHES])
    print()
    print(harness.format_table(
        ["requests/s", "bare C pread/pwrite", "Python os.preadv", "pyvmm 1/kick",
         f"pyvmm {BATCHES[1]}/kick", "Async 1/kick", f"Async {BATCHES[1]}/kick",
         "pyvmm 1/kick / bare", f"pyvmm {BATCHES[1]}/kick / bare",
         "Async/Sync 1/kick", f"Async/Sync {BATCHES[1]}/kick"],
        rows))
    data = {"benchmark": "blk-model", "machine": facts,
            "params": {"reps": reps, "sizes": SIZES, "scale": args.model_scale,
                       "batches": BATCHES, "image": str(path)},
            "summary": summary, "samples": samples}
    out = harness.write_json("blk-model", data)
    print(f"wrote {out}")
    return data


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    add_arguments(p)
    main(p.parse_args())

"""What the tests and the benchmarks share (Firecracker's tests/framework in spirit).

- microvm:  MicrovmFactory (booted pyvmm.microvm.MicroVM objects, closed at
            teardown), run_in_shell(), INIT_MARKER, BOOT_TIMEOUT
- process:  Process, the one way a pyvmm (or QEMU) process is spawned and
            watched; run_pyvmm() for a run to completion
- images:   the guest images: PVH ELF, bzImage, the echo and tiny guests, cpio
- netns:    NetNamespace, a network namespace of our own with a TAP device
- api:      the OpenAPI-checked API client and the stand-in VM for API route tests
- debian_kernel: Debian 12's generic XZ bzImage (linux-image-amd64), cached by
            firmware/fetch-debian-kernel.sh; find() looks, ensure() fetches

Imported as `tests.framework` (tests/ is a package): pytest puts the
repository root on sys.path for tests/conftest.py, and `python -m benches`
runs from the repository root, so both find the same modules under the same
name, and a `tests` package installed elsewhere cannot shadow it.
"""

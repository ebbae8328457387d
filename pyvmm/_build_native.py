"""cffi build script for pyvmm._native (out-of-line API mode).

One extension holds both the KVM ABI declarations (checked by the C compiler
against <linux/kvm.h>, so a layout mistake fails the build) and the C core in
csrc/: the vCPU run loop, the address-range buses and the C devices.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
KVM_CDEF = Path(__file__).resolve().parent / "kvm" / "kvm_abi.cdef"
C_SOURCES = ["vcpu_loop.c", "bus.c", "ioctl.c", "dev_debugcon.c", "dev_debugexit.c", "dev_scratch.c",
             "seccomp.c", "uring.c"]

# cffi takes the GIL again inside this callback, and only there.
PYTHON_CALLBACKS = """
extern "Python" int pv_py_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len, int is_write);
"""


def _header_cdef() -> str:
    text = (CSRC / "pyvmm.h").read_text()
    match = re.search(r"/\* cdef-begin \*/(.*)/\* cdef-end \*/", text, re.S)
    if not match:
        raise RuntimeError("csrc/pyvmm.h lost its cdef-begin/cdef-end markers")
    return match.group(1)


ffibuilder = FFI()
ffibuilder.cdef(KVM_CDEF.read_text() + _header_cdef() + PYTHON_CALLBACKS)
ffibuilder.set_source(
    "pyvmm._native",
    '#include <linux/kvm.h>\n#include "pyvmm.h"\n',
    # setuptools refuses absolute source paths, so name them from the cwd.
    sources=[os.path.relpath(CSRC / name) for name in C_SOURCES],
    include_dirs=[os.path.relpath(CSRC)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    # libseccomp-dev (csrc/seccomp.c), liburing-dev (csrc/uring.c)
    libraries=["pthread", "seccomp", "uring"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose=True)

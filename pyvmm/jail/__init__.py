"""`pyvmm jail`: confine a VMM process as Firecracker's jailer does (see jailer.py and
docs/jail.md)."""
from pyvmm.jail.jailer import DEFAULT_BASE, JailError, JailSpec, run

__all__ = ["DEFAULT_BASE", "JailError", "JailSpec", "run"]

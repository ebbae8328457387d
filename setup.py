"""The C extension is built by cffi from pyvmm/_build_native.py (API mode)."""
from setuptools import setup

setup(cffi_modules=["pyvmm/_build_native.py:ffibuilder"])

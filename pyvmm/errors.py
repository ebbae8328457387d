"""The root of pyvmm's errors.

Every module raises its own subclass (KvmError, GuestMemoryError, BootError,
...), and each message is one sentence that says what is wrong and what to do,
because the CLI prints it as is, without a traceback.
"""


class PyvmmError(Exception):
    """Base class of every error pyvmm raises on purpose."""

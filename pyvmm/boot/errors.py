from pyvmm.errors import PyvmmError


class BootError(PyvmmError):
    """The kernel, initrd or command line cannot be booted as given."""

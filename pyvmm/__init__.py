"""pyvmm: a virtual machine monitor on /dev/kvm, orchestrated from Python."""
__version__ = "0.1.0"

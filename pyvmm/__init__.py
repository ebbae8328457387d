"""pyvmm: a virtual machine monitor on /dev/kvm, orchestrated from Python."""

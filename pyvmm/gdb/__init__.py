"""A gdb stub: gdb's remote serial protocol over the Machine's vCPUs (issue 18).

protocol.py frames packets, target.py stops, steps and inspects the vCPUs,
registers.py lays out gdb's amd64 registers, server.py is the socket and the session.
"""

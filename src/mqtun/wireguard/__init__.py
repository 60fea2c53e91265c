"""WireGuard for mqtun: a sans-IO protocol core (this package) and, later, a thin shell.

Every module here is pure: bytes in, bytes or decisions out, time passed in as `now`. Nothing
opens a socket or a device. The shell (`endpoint.py`) owns the I/O.
"""

"""Compatibility faces over mqtun for code written against other TUN/TAP libraries.

`from mqtun.compat import pytun` replaces `import pytun` (python-pytun): the same names, the
same behaviour and exceptions, built on mqtun's Device and Queue.
"""

__all__ = ["pytun"]

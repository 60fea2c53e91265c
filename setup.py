"""The package's C extensions, both optional (without a compiler the package builds without
them): mqtun.packet._accel, the offload codecs' loops (else mqtun.packet.gso uses numpy), and
mqtun._reads, a drain's reads in one call (else mqtun.queue loops over os.read).
Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("mqtun.packet._accel", ["src/mqtun/packet/_accel.c"], optional=True,
                  extra_compile_args=["-O2"]),
        Extension("mqtun._reads", ["src/mqtun/_reads.c"], optional=True,
                  extra_compile_args=["-O2"]),
    ],
)

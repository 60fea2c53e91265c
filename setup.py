"""The package's one C extension, mqtun.packet._accel (optional: without a compiler the
package builds without it and mqtun.packet.gso uses numpy). Everything else is in
pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("mqtun.packet._accel", ["src/mqtun/packet/_accel.c"], optional=True,
                  extra_compile_args=["-O2"]),
    ],
)

"""Argument types shared by the `mqtun` command and the apps that add their own subcommands."""

from __future__ import annotations

import argparse

from mqtun.errors import InvalidArgumentError


def device_name(value: str) -> str:
    """An argparse type: a device name the kernel would take as it is (never truncated)."""
    from mqtun.device import validate_name  # the CLI imports devices only when it runs

    try:
        if not value:
            raise InvalidArgumentError("the device name is empty")
        validate_name(value)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value

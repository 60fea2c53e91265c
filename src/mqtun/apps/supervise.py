"""What `mqtun forward` and `mqtun tunnel` share: supervising a WorkerPool from the main loop.

Signal handlers only set flags (request_stop, request_stats); `run()` polls the pool, prints
per-queue statistics when asked, and turns a vanished device into one DeviceGoneError.
`run_command` is the command-line contract both commands keep (signals, the READY line,
QSTAT lines on stderr): the one place it is printed.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import ClassVar

from mqtun import _uapi
from mqtun.errors import DeviceGoneError, InvalidArgumentError
from mqtun.runtime.workers import WorkerPool


class PoolSupervisor:
    """A program built on one WorkerPool. Subclasses set the nouns and `qstat_lines()`."""

    NOUN: ClassVar[str] = "program"  # "open() the NOUN first"
    STOPPED: ClassVar[str] = "stopped"  # "STOPPED: <why>"
    OP: ClassVar[str] = ""  # the operation named in the error

    pool: WorkerPool | None
    _stats_requested: bool = False
    _stop_requested: bool = False

    def qstat_lines(self) -> list[str]:
        raise NotImplementedError

    def open(self) -> None:
        raise NotImplementedError

    def run_command(self, ready: Callable[[], str]) -> None:
        """As a command: SIGTERM/SIGINT stop it, SIGUSR1 prints the QSTAT lines on stderr,
        `ready()` is printed on stdout once open; then supervise until stopped. The caller
        closes, whatever happened."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())
        signal.signal(signal.SIGUSR1, lambda *_: self.request_stats())
        self.open()
        print(ready(), flush=True)
        self.run(on_stats=lambda lines: print("\n".join(lines), file=sys.stderr, flush=True))

    def request_stop(self) -> None:
        """Safe in a signal handler."""
        self._stop_requested = True
        if self.pool is not None:
            self.pool.request_stop()

    def request_stats(self) -> None:
        """Safe in a signal handler: `run()` calls its on_stats soon."""
        self._stats_requested = True
        if self.pool is not None:
            self.pool.wake()

    def run(self, on_stats: Callable[[list[str]], None] | None = None) -> None:
        """Supervise until request_stop(). Raises DeviceGoneError if a device disappears."""
        pool = self.pool
        if pool is None:
            raise InvalidArgumentError(f"open() the {self.NOUN} first")
        while not self._stop_requested and not pool.gone:
            pool.poll(0.5)
            if self._stats_requested:
                self._stats_requested = False
                if on_stats is not None:
                    on_stats(self.qstat_lines())
        if pool.gone and not self._stop_requested:
            raise DeviceGoneError(_uapi.EBADFD, f"{self.STOPPED}: {pool.gone[0]}", op=self.OP)

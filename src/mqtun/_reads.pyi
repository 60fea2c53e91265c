from collections.abc import Callable, Sequence
from typing import Any

def read_drain(fd: int, size: int, limit: int, /) -> tuple[list[bytes], int, int]: ...
def serve(epfd: int, on: dict[int, Callable[[], object]], stopping: Callable[[], object],
          spin: object, busy: bool, /) -> None: ...

class RelayDrain:
    """One drain of a route, read, counted and (small) relayed in C."""

    def __init__(self, in_fd: int, size: int, limit: int, out_fd: int, relay_max: int,
                 gso_at: int, read_slots: Any, written_slots: Any, slots: tuple[int, ...],
                 read_header: int, written_header: int,
                 rest: Callable[[list[bytes], int, int, int], int], *,
                 supers: tuple[int, int, bool, bool, int, int, int, int, int] | None = ...,
                 join: Callable[[list[bytes]], tuple[list[Any], list[int] | None]] | None = ...,
                 ) -> None: ...
    def __call__(self) -> int: ...

def count_segments(buf: Any, gso_at: int,
                   supers: tuple[int, int, bool, bool, int, int, int, int, int] | None,
                   /) -> int: ...
def write_each(fd: int, bufs: Sequence[Any], start: int, /) -> tuple[int, int, int]: ...

class QueueFile:
    """fileno/read/write of one queue in C: a base class (see mqtun.compat.pytun)."""

    _queue: object
    _held: object
    def fileno(self) -> int: ...
    def read(self, size: int, /) -> bytes: ...
    def write(self, data: bytes, /) -> int: ...

"""`mqtun wg --queues N` with N > 1: one worker process per TUN queue, one main process.

Division of labour:
- Worker i owns TUN queue i and UDP socket i of a SO_REUSEPORT group on the listen port. It
  encrypts what its queue reads (routing by its copy of the allowed IPs, counters drawn from
  the shared `CounterTable`), and decrypts transport messages whose receiver index it owns
  (index % N == i), writing them to its queue. A transport message that reached another
  worker's socket is passed to its owner; handshake messages and cookie replies go to the
  main process. So every keypair is decrypted by exactly one process: one replay window per
  keypair, the guarantee is the single-process one.
- The main process does the handshakes (choosing the receive index for the worker whose
  socket the peer's datagrams reach), the timers, the configuration socket and the statistics
  for `wg show`; it tells the workers every new keypair, key confirmation, endpoint and
  allowed-IPs change. It sends its own datagrams (handshakes, keepalives, staged packets)
  through worker 0's socket.

Messages are pickled tuples over unix SOCK_SEQPACKET socket pairs made before the fork: one
between the main process and each worker (control: a send waits, never drops), one between
each two workers (forwarded datagrams: lossy, like a network queue, a send never waits).
"""

from __future__ import annotations

import array
import contextlib
import os
import pickle
import select
import selectors
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from mqtun.errors import DeviceGoneError, MqtunError
from mqtun.packet.checksum import numpy as load_numpy
from mqtun.runtime.sockets import UdpEndpoint
from mqtun.wireguard import messages as m
from mqtun.wireguard.core import Output, Peer, WireguardCore, _ip_destination
from mqtun.wireguard.datapath import Outbox, read_tun, receive_datagrams
from mqtun.wireguard.endpoint import Endpoint
from mqtun.wireguard.noise import Keypair, new_private_key
from mqtun.wireguard.session import CounterBlocks, CounterTable, TransportKeys
from mqtun.wireguard.timers import REJECT_AFTER_TIME, jitter
from mqtun.wireguard.uapi import SetResult

__all__ = ["MultiEndpoint"]

_BATCH = 64
_TICK = 0.1
_MAX_MESSAGE = 1 << 17
_CONTROL_TIMEOUT = 2.0
# datagrams per message to another worker: _FORWARD of _WIRE_SIZE bytes, or one bigger one,
# stay within _MAX_MESSAGE
_FORWARD, _WIRE_SIZE = 64, 1500
_HOLD, _HOLD_TIME = 16, 1.0  # transport messages held for a keypair not announced yet


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (a, b):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        end.setblocking(False)  # (a socket timeout would make every receive wait first)
    return a, b


def _send(sock: socket.socket, message: tuple[Any, ...], fds: Sequence[int] = (), *,
          lossy: bool = False) -> bool:
    """Send one message; a control send waits (bounded), a lossy one gives up at once."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
        if fds else []
    deadline = time.monotonic() + _CONTROL_TIMEOUT
    while True:
        try:
            sock.sendmsg([data], ancillary)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if lossy or left <= 0:
                return False
            select.select([], [sock], [], left)
        except OSError:  # the other side is gone: the main loop notices that
            return False


def _receive(sock: socket.socket) -> tuple[tuple[Any, ...], list[int]] | None:
    """One message if one is waiting (never waits), with the descriptors it carried."""
    try:
        data, ancillary, _flags, _addr = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(4))
    except (BlockingIOError, InterruptedError):
        return None
    if not data:
        raise EOFError
    fds = [fd for level, kind, raw in ancillary
           if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for fd in array.array("i", raw[: len(raw) - len(raw) % 4])]
    return pickle.loads(data), fds


class MultiEndpoint(Endpoint):
    """An Endpoint whose data path runs in one worker process per TUN queue."""

    def __init__(self, ifname: str, *, queues: int, **kwargs: Any) -> None:
        self.workers = queues
        self.table = CounterTable(max(1024, 8 * queues))
        self.slots: dict[int, int] = {}  # local index -> counter slot
        self.group: list[socket.socket] = []
        self.links: list[socket.socket] = []  # to each worker, made when they are forked
        super().__init__(ifname, queues=queues, **kwargs)
        self.pids: list[int] = []

    # -- hooks of Endpoint ---------------------------------------------------------------
    def _bind(self, port: int, *, reuse_port: bool = False) -> socket.socket:
        first = super()._bind(port, reuse_port=True)
        port = int(first.getsockname()[1])
        group = [first]
        try:
            for _ in range(self.workers - 1):
                group.append(super()._bind(port, reuse_port=True))
        except BaseException:
            for sock in group:
                sock.close()
            raise
        self.group = group
        return first

    def _rebind(self, port: int) -> None:
        old = self.group
        self.sock = self._bind(port)
        for link, sock in zip(self.links, self.group, strict=False):
            _send(link, ("socket",), [sock.fileno()])
        for sock in old + self.group[1:]:  # the workers hold their own now
            sock.close()
        self.group = self.group[:1]

    def _new_core(self, private_key: bytes) -> WireguardCore:
        core = super()._new_core(private_key)
        core.index_modulus = self.workers
        core.counters_for = self._counters_for
        core.on_session = self._broadcast_keypair
        self._broadcast(("clear",))
        return core

    def set(self, body: str) -> SetResult:
        with self.lock:
            result = super().set(body)
            if result.errno == 0:
                self._broadcast_peers()
            return result

    # -- main-process side ----------------------------------------------------------------
    def _counters_for(self, keypair: Keypair) -> CounterBlocks:
        slot = self.table.assign()
        self.slots[keypair.local_index] = slot
        return self.table.blocks(slot)

    def _broadcast(self, message: tuple[Any, ...]) -> None:
        for link in self.links:
            _send(link, message)

    def _broadcast_keypair(self, peer: Peer, keys: TransportKeys) -> None:
        slot = self.slots[keys.keypair.local_index]
        self._broadcast(("keypair", peer.public_key, keys.keypair, slot))

    def _broadcast_peers(self) -> None:
        if self.core is None:
            self._broadcast(("peers", []))
            return
        snapshot = [(p.public_key, p.endpoint, [str(n) for n in self.core.allowed_ips.entries(p)])
                    for p in self.core.peers.values()]
        self._broadcast(("peers", snapshot))

    def _release_slots(self) -> None:
        live: set[int] = set()
        if self.core is not None:
            for peer in self.core.peers.values():
                s = peer.session
                live |= {k.keypair.local_index for k in (s.current, s.previous, s.next)
                         if k is not None}
        for index in [i for i in self.slots if i not in live]:
            self.table.release(self.slots.pop(index))

    def run(self, stop: threading.Event) -> None:
        links = [_pair() for _ in range(self.workers)]
        between = {(i, j): _pair() for i in range(self.workers) for j in range(i + 1, self.workers)}
        for i in range(self.workers):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    mine = {j if a == i else a: (ends[0] if a == i else ends[1])
                            for (a, j), ends in between.items() if i in (a, j)}
                    for j, (main_end, worker_end) in enumerate(links):
                        main_end.close()
                        if j != i:
                            worker_end.close()
                    for ends in between.values():
                        for end in ends:
                            if end not in mine.values():
                                end.close()
                    code = _Worker(self, i, links[i][1], mine).run()
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code)
            self.pids.append(pid)
        for main_end, worker_end in links:
            worker_end.close()
            self.links.append(main_end)
        for ends in between.values():
            for end in ends:
                end.close()
        for sock in self.group[1:]:
            sock.close()  # the workers hold them; the main process sends on socket 0
        self.group = self.group[:1]
        with self.lock:
            self._broadcast_peers()
        super().run(stop)

    def _loop(self, stop: threading.Event) -> None:
        sel = selectors.DefaultSelector()
        for link in self.links:
            sel.register(link, selectors.EVENT_READ)
        next_tick = time.monotonic()
        while not stop.is_set():
            for key, _ in sel.select(_TICK):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                for _ in range(_BATCH):
                    try:
                        got = _receive(conn)
                    except (EOFError, OSError):  # that worker ended: the check below sees it
                        sel.unregister(conn)
                        break
                    if got is None:
                        break
                    with self.lock:
                        self._handle(got[0])
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + _TICK
                with self.lock:
                    if self.core is not None:
                        self._emit(self.core.tick(now))
                        self._release_slots()
                if self._a_worker_ended():
                    break
        sel.close()

    def _a_worker_ended(self) -> bool:
        for pid in self.pids:
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.pids.remove(pid)
                    return True  # the device is gone (or a worker failed): stop all
        return False

    def _handle(self, message: tuple[Any, ...]) -> None:
        core, now = self.core, time.monotonic()
        if core is None:
            return
        kind = message[0]
        if kind == "datagram":  # a handshake message or cookie reply a worker received
            _, data, src, via = message
            self._emit(core.receive(data, src, now, via=via))
        elif kind == "stage":  # packets for a peer without a usable session
            peer = core.peers.get(message[1])
            if peer is not None:
                self._emit(core.send_many(peer, message[2], now))
        elif kind == "handshake":
            peer = core.peers.get(message[1])
            if peer is not None:
                self._emit(core.initiate(peer, now))
        elif kind == "confirmed":
            peer = core.peers.get(message[1])
            if peer is not None:
                self._emit(core.confirm(peer, message[2], now))
                self._broadcast(("promote", message[1], message[2]))
        elif kind == "stats":
            self._stats(core, message[2], now)

    def _stats(self, core: WireguardCore, stats: dict[bytes, tuple[Any, ...]],
               now: float) -> None:
        roamed = False
        for key, (rx, tx, sent_data, got_data, got_auth, endpoint, via) in stats.items():
            peer = core.peers.get(key)
            if peer is None:
                continue
            peer.rx_bytes += rx
            peer.tx_bytes += tx
            if tx:
                peer.timers.on_authenticated_sent()
                peer.timers.on_authenticated_traversal(now)
            if sent_data:
                peer.timers.on_data_sent(now, jitter())
            if got_auth:
                peer.owner = via
                peer.timers.on_authenticated_received()
                peer.timers.on_authenticated_traversal(now)
            if got_data:
                peer.timers.on_data_received(now)
            if endpoint is not None and endpoint != peer.endpoint:
                peer.endpoint = endpoint
                roamed = True
        if roamed:
            self._broadcast_peers()

    def close(self) -> None:
        self._broadcast(("stop",))
        deadline = time.monotonic() + 2
        while self.pids and time.monotonic() < deadline:
            self._a_worker_ended()
            time.sleep(0.02)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()
        for link in self.links:
            link.close()
        for sock in self.group:
            sock.close()
        super().close()


class _Worker:
    """One TUN queue and one socket of the group, in a forked process."""

    def __init__(self, parent: MultiEndpoint, index: int, link: socket.socket,
                 others: dict[int, socket.socket]) -> None:
        self.index = index
        self.n = parent.workers
        self.table = parent.table
        self.queue = parent.device.queues[index]
        self.sock = parent.group[index]
        self.offloaded = parent.offloaded
        self.udp = UdpEndpoint(self.sock, gro=self.offloaded)
        self.outbox = Outbox(self.offloaded)  # a wake-up's decrypted packets, written together
        for i, sock in enumerate(parent.group):
            if i != index:
                sock.close()
        parent.control.close_listener()
        self.link = link
        self.others = others
        # a mirror of the sessions: the identity is a stand-in, a worker never handshakes
        self.core = WireguardCore(new_private_key())
        self.core.handshakes = False
        self.core.mtu = parent.mtu
        self.stats: dict[bytes, list[Any]] = {}
        self.held: dict[int, list[tuple[float, bytes, tuple[str, int], int]]] = {}

    def _tell(self, message: tuple[Any, ...]) -> None:
        _send(self.link, message)

    def run(self) -> int:
        load_numpy()  # import numpy now, not in the middle of the first packets (see runtime)
        sel = selectors.DefaultSelector()
        sel.register(self.queue.fileno(), selectors.EVENT_READ, "tun")
        sel.register(self.sock, selectors.EVENT_READ, "udp")
        sel.register(self.link, selectors.EVENT_READ, "main")
        for other in self.others.values():
            sel.register(other, selectors.EVENT_READ, "worker")
        next_report = time.monotonic() + _TICK
        try:
            while True:
                ready = {key.data for key, _ in sel.select(_TICK)}
                # the main process first: a keypair announced there must be installed before
                # the datagrams under it, which may be ready in the same wake-up, are read
                if "main" in ready and not self._from_main(sel):
                    return 0
                if "worker" in ready:
                    self._from_workers()
                if "udp" in ready:
                    self._from_udp()
                self.outbox.flush(self.queue)
                if "tun" in ready:
                    self._from_tun()
                now = time.monotonic()
                if now >= next_report:
                    next_report = now + _TICK
                    self._report()
        except DeviceGoneError:
            return 0
        except MqtunError:
            return 1

    def _stat(self, peer: Peer) -> list[Any]:
        entry = self.stats.get(peer.public_key)
        if entry is None:
            entry = self.stats[peer.public_key] = [0, 0, False, False, False, None, None]
        return entry

    def _report(self) -> None:
        now = time.monotonic()
        for index in [i for i, held in self.held.items() if now - held[0][0] > _HOLD_TIME]:
            self.core.drops[m.DropReason.UNKNOWN_INDEX.value] += len(self.held.pop(index))
        if self.core.wants_handshake:
            for key in self.core.wants_handshake:
                self._tell(("handshake", key))
            self.core.wants_handshake.clear()
        if self.stats:
            self._tell(("stats", self.index, {k: tuple(v) for k, v in self.stats.items()}))
            self.stats.clear()

    def _emit(self, out: Output) -> None:
        """Send the datagrams now; the packets are written after this wake-up's reads."""
        self.outbox.emit(self.udp, out.datagrams, out.packets)

    def _from_tun(self) -> None:
        now = time.monotonic()
        # DeviceGoneError ends the worker
        for segments in read_tun(self.queue, self.offloaded, _BATCH):
            dst = _ip_destination(segments[0])
            peer = self.core.allowed_ips.lookup(dst) if dst is not None else None
            if peer is None:
                self.core.drops[m.DropReason.NO_ROUTE.value] += len(segments)
                continue
            current = peer.session.current
            if current is None or now - current.keypair.created >= REJECT_AFTER_TIME:
                self._tell(("stage", peer.public_key, [bytes(s) for s in segments]))
                continue
            before = peer.tx_bytes
            self._emit(self.core.send_many(peer, segments, now))
            stat = self._stat(peer)
            stat[1] += peer.tx_bytes - before
            stat[2] = True

    def _from_udp(self) -> None:
        self._datagrams(receive_datagrams(self.udp, _BATCH), self.index)

    def _datagram(self, data: bytes, src: tuple[str, int], via: int) -> None:
        self._datagrams([(data, src)], via)

    def _datagrams(self, batch: list[tuple[bytes, tuple[str, int]]], via: int) -> None:
        """Datagrams that reached worker `via`'s socket (this one, or passed on to us), in
        order: transport messages under our indexes are opened in runs, handshakes go to the
        main process, another worker's transport messages to that worker."""
        mine: list[tuple[bytes, tuple[str, int]]] = []
        theirs: dict[int, list[tuple[bytes, tuple[str, int]]]] = {}
        last = b""  # type and index of the last one taken as ours: the next of a run is too
        for data, src in batch:
            if data[:8] == last:
                mine.append((data, src))
                continue
            last = b""
            if data[:1] != b"\x04" or len(data) < 8:
                self._open(mine, via)
                self._tell(("datagram", data, src, self.index))
                continue
            index = int.from_bytes(data[4:8], "little")
            owner = index % self.n
            if owner != self.index:  # passed on in runs of at most _FORWARD wire-size ones
                run = theirs.setdefault(owner, [])
                if len(run) >= _FORWARD or (run and len(data) > _WIRE_SIZE):
                    _send(self.others[owner], ("transports", run, via), lossy=True)
                    run = theirs[owner] = []
                run.append((data, src))
                continue
            if index not in self.core._indexes:
                self._open(mine, via)
                # perhaps under a keypair whose announcement is still on its way: hold it
                held = self.held.setdefault(index, [])
                if len(held) < _HOLD and len(self.held) < 64:
                    held.append((time.monotonic(), data, src, via))
                else:
                    self.core.drops[m.DropReason.UNKNOWN_INDEX.value] += 1
                continue
            mine.append((data, src))
            last = data[:8]
        self._open(mine, via)
        for owner, run in theirs.items():
            if run:
                _send(self.others[owner], ("transports", run, via), lossy=True)

    def _open(self, mine: list[tuple[bytes, tuple[str, int]]], via: int) -> None:
        """Open a run of transport messages under indexes we own (and empty the list)."""
        if not mine:
            return
        indexes = self.core._indexes
        peers = {indexes[int.from_bytes(i, "little")] for i in {d[4:8] for d, _ in mine}}
        before = {p: (p.rx_bytes, p.endpoint, p.session.next) for p in peers}
        out = self.core.receive_batch(mine, time.monotonic())
        mine.clear()
        self._emit(out)
        for peer, (rx, endpoint, pending) in before.items():
            if peer.rx_bytes == rx:
                continue  # all refused: counted in this worker's drops
            stat = self._stat(peer)
            stat[0] += peer.rx_bytes - rx
            stat[4] = True
            stat[6] = via  # whose socket this peer's datagrams reach: its next index is theirs
            stat[3] = stat[3] or bool(out.packets)
            if peer.endpoint != endpoint:
                stat[5] = peer.endpoint
            if pending is not None and peer.session.current is pending:
                self._tell(("confirmed", peer.public_key, pending.keypair.local_index))

    def _from_workers(self) -> None:
        for other in self.others.values():
            for _ in range(_BATCH):
                try:
                    got = _receive(other)
                except (EOFError, OSError):
                    break
                if got is None:
                    break
                _, run, via = got[0]
                self._datagrams(run, via)

    def _from_main(self, sel: selectors.BaseSelector) -> bool:
        for _ in range(_BATCH):
            try:
                got = _receive(self.link)
            except (EOFError, OSError):
                return False  # the main process is gone
            if got is None:
                return True
            message, fds = got
            kind = message[0]
            if kind == "stop":
                return False
            if kind == "keypair":
                _, key, keypair, slot = message
                peer = self.core.peers.get(key)
                if peer is not None:
                    self.core.install_keypair(peer, keypair, self.table.blocks(slot))
                    for _, data, src, via in self.held.pop(keypair.local_index, []):
                        self._datagram(data, src, via)
            elif kind == "promote":
                peer = self.core.peers.get(message[1])
                if peer is not None:
                    peer.session.promote(message[2])
            elif kind == "peers":
                self._sync_peers(message[1])
            elif kind == "clear":
                for peer in list(self.core.peers.values()):
                    self.core.remove_peer(peer)
            elif kind == "socket" and fds:
                sel.unregister(self.sock)
                self.sock.close()
                self.sock = socket.socket(fileno=fds[0])
                self.sock.setblocking(False)
                self.udp = UdpEndpoint(self.sock, gro=self.offloaded)
                sel.register(self.sock, selectors.EVENT_READ, "udp")
        return True

    def _sync_peers(self, snapshot: list[tuple[bytes, tuple[str, int] | None, list[str]]]) -> None:
        keys = {key for key, _, _ in snapshot}
        for key in [k for k in self.core.peers if k not in keys]:
            self.core.remove_peer(self.core.peers[key])
        for key, endpoint, nets in snapshot:
            peer = self.core.peers.get(key) or self.core.add_peer(key)
            peer.endpoint = endpoint
            self.core.allowed_ips.remove_peer(peer)
            for net in nets:
                self.core.allowed_ips.insert(net, peer)

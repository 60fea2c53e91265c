"""The shell around `WireguardCore`: a TUN device, one UDP socket, the configuration socket.

wireguard-go's contract: `Endpoint(ifname).run(stop)` creates the TUN IFNAME (MTU 1420),
serves /var/run/wireguard/IFNAME.sock (mode 0600) so that `wg`/`wg-quick` configure it, and
moves packets until `stop` is set or the interface is deleted. Datagrams and packets go
through one selector loop over the TUN queues and the UDP socket; the configuration socket
runs in a thread and changes the core under the same lock. The UDP socket is dual-stack
(IPv6 with IPv4-mapped addresses) and rebinds when `listen_port` changes.

Offloads (the default): the TUN has a virtio-net header and TSO/USO, the socket UDP_GRO, so
a super-packet is read, split and sent as one UDP GSO train, and a train of datagrams is
decrypted and written as one coalesced super-packet (`mqtun.wireguard.datapath`).

Single process: with --queues N the N queues are drained by the one loop (`MultiEndpoint`,
mqtun.wireguard.workers, runs one worker process per queue instead).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time

from mqtun.device import Device
from mqtun.errors import DeviceGoneError, MqtunError
from mqtun.runtime.sockets import UdpEndpoint
from mqtun.wireguard.control import ControlSocket
from mqtun.wireguard.core import Output, Peer, WireguardCore
from mqtun.wireguard.datapath import (
    TUN_OFFLOADS,
    Outbox,
    read_tun,
    receive_datagrams,
    tune_socket,
)
from mqtun.wireguard.uapi import DeviceConfig, PeerConfig, SetResult, apply_set, format_get

__all__ = ["DEFAULT_MTU", "Endpoint"]

DEFAULT_MTU = 1420
_BATCH = 64
_TICK = 0.1


class Endpoint:
    """One WireGuard interface served by this process."""

    def __init__(self, ifname: str, *, queues: int = 1, mtu: int = DEFAULT_MTU,
                 offloads: bool = True) -> None:
        self.config = DeviceConfig()
        self.core: WireguardCore | None = None
        self.lock = threading.RLock()
        self.offloaded = offloads
        self.device = Device.create(ifname, queues, blocking=False, vnet_hdr=offloads,
                                    offloads=int(TUN_OFFLOADS) if offloads else 0)
        self.ifname = self.device.name
        self._udp: UdpEndpoint | None = None
        self._outbox = Outbox(offloads)  # a batch's decrypted packets, written together
        try:
            self.device.link.set_mtu(mtu)
            self.mtu = mtu
            self.sock = self._bind(0)
            self.control = ControlSocket(self.ifname, self)
        except BaseException:
            self.device.close()
            raise

    # -- configuration (ControlHandler) -------------------------------------------------
    def get(self) -> str:
        with self.lock:
            self._refresh_state()
            return format_get(self.config)

    def set(self, body: str) -> SetResult:
        with self.lock:
            result = apply_set(self.config, body)
            if result.errno == 0:
                try:
                    self._apply(result)
                except OSError as exc:
                    result.errno = -(exc.errno or 5)
            return result

    def _refresh_state(self) -> None:
        if self.core is None:
            return
        for key, peer in self.core.peers.items():
            conf = self.config.peers.get(key)
            if conf is not None:
                conf.rx_bytes, conf.tx_bytes = peer.rx_bytes, peer.tx_bytes
                conf.last_handshake_time_ns = peer.last_handshake_ns
                conf.endpoint = peer.endpoint

    def _apply(self, result: SetResult) -> None:
        if result.listen_port_changed and self.config.listen_port != self._port():
            self._rebind(self.config.listen_port)
            self.config.listen_port = self._port()
        if result.fwmark_changed or result.listen_port_changed:
            # the mark routes our encrypted datagrams (wg-quick's policy routing relies on it)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.config.fwmark)
        if result.private_key_changed:
            self._refresh_state()
            self.core = None
            if self.config.private_key is not None:
                self.core = self._new_core(self.config.private_key)
                result.peers_changed |= set(self.config.peers)
        if self.core is None:
            return
        for key in result.peers_removed:
            old = self.core.peers.get(key)
            if old is not None:
                self.core.remove_peer(old)
        for key in result.peers_changed:
            conf = self.config.peers.get(key)
            if conf is not None:
                self._sync_peer(self.core, conf, turn_on=key in result.keepalive_turned_on)

    def _sync_peer(self, core: WireguardCore, conf: PeerConfig, *, turn_on: bool) -> None:
        peer = core.peers.get(conf.public_key)
        if peer is None:
            peer = core.add_peer(conf.public_key, preshared_key=conf.preshared_key)
            peer.rx_bytes, peer.tx_bytes = conf.rx_bytes, conf.tx_bytes
        peer.handshake.preshared_key = conf.preshared_key
        peer.endpoint = conf.endpoint
        peer.timers.persistent_keepalive_interval = conf.persistent_keepalive_interval
        core.allowed_ips.remove_peer(peer)
        for net in conf.allowed_ips:
            core.allowed_ips.insert(net, peer)
        if turn_on and peer.endpoint is not None:
            self._emit(core.keepalive(peer, time.monotonic()))

    def _new_core(self, private_key: bytes) -> WireguardCore:
        core = WireguardCore(private_key)
        core.mtu = self.mtu
        return core

    def _rebind(self, port: int) -> None:
        new = self._bind(port)
        self.sock.close()
        self.sock = new

    # -- I/O ---------------------------------------------------------------------------
    def _bind(self, port: int, *, reuse_port: bool = False) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if reuse_port:  # a group of sockets on one port, one per worker
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            tune_socket(sock, gro=self.offloaded)
            sock.bind(("::", port))
        except OSError as exc:
            with contextlib.suppress(UnboundLocalError):
                sock.close()
            raise MqtunError(exc.errno or 98, f"cannot listen on UDP port {port}: "
                             f"{exc.strerror}", device=self.ifname, op="wg") from None
        sock.setblocking(False)
        return sock

    def _port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def udp(self) -> UdpEndpoint:
        """The current socket (rebound by `listen_port`) as a UdpEndpoint (GSO sends, GRO reads)."""
        if self._udp is None or self._udp.sock is not self.sock:
            self._udp = UdpEndpoint(self.sock, gro=self.offloaded)
        return self._udp

    def _emit(self, out: Output) -> None:
        """Send the datagrams now; the packets wait for `_flush` (the end of the batch)."""
        self._outbox.emit(self.udp, out.datagrams, out.packets)

    def _flush(self) -> None:
        self._outbox.flush(self.device.queues[0])

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set or the interface disappears (DeviceGoneError ends it)."""
        control_stop = threading.Event()
        control = threading.Thread(target=self.control.serve, args=(control_stop,),
                                   name=f"wg-uapi-{self.ifname}", daemon=True)
        control.start()
        try:
            self._loop(stop)
        except DeviceGoneError:
            pass  # `ip link del IFNAME`: wireguard-go's signal to shut down, not an error
        finally:
            control_stop.set()
            control.join(timeout=2)
            self.close()

    def _loop(self, stop: threading.Event) -> None:
        sel = selectors.DefaultSelector()
        for queue in self.device.queues:
            sel.register(queue.fileno(), selectors.EVENT_READ, queue)
        sock = None
        next_tick = time.monotonic()
        while not stop.is_set():
            if sock is not self.sock:  # (re)bound by a set operation
                if sock is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        sel.unregister(sock)
                sock = self.sock
                sel.register(sock, selectors.EVENT_READ, None)
            for key, _ in sel.select(_TICK):
                with self.lock:
                    core = self.core
                    if key.data is None:
                        datagrams = receive_datagrams(self.udp, _BATCH)
                        if core is not None:
                            self._emit(core.receive_batch(datagrams, time.monotonic()))
                            self._flush()
                    else:  # DeviceGoneError ends the loop
                        reads = read_tun(key.data, self.offloaded, _BATCH)
                        if core is not None:
                            now = time.monotonic()
                            for segments in reads:
                                self._emit(core.send_batch(segments, now))
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + _TICK
                with self.lock:
                    if self.core is not None:
                        self._emit(self.core.tick(now))
                        self._flush()
        sel.close()

    def close(self) -> None:
        self.control.close()
        self.sock.close()
        self.device.close()

    def peer(self, public_key: bytes) -> Peer | None:
        return None if self.core is None else self.core.peers.get(public_key)

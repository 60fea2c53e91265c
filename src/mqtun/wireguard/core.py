"""A whole WireGuard interface as a sans-IO object: datagrams and IP packets in, out the same.

`WireguardCore` ties the pieces: the static identity and its cookie checker, one `Peer` per
configured public key (handshake, session, timers, endpoint, byte counters), the index table
that maps a receiver index to its peer, and the allowed-IPs table that routes outbound packets
and filters inbound ones. `receive` takes one UDP datagram and returns what to do (datagrams to
send, IP packets for the TUN); `send` takes one IP packet from the TUN. Every refusal is
counted in `drops` by reason; nothing here raises on bad input, reads a clock or does I/O.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from mqtun.packet.headers import Buffer
from mqtun.wireguard import messages as m
from mqtun.wireguard.allowed_ips import AllowedIPs
from mqtun.wireguard.cookie import source_bytes
from mqtun.wireguard.noise import Handshake, Keypair, StaticIdentity, consume_initiation, tai64n
from mqtun.wireguard.session import CounterBlocks, Session, TransportKeys
from mqtun.wireguard.timers import (
    REJECT_AFTER_TIME,
    REKEY_TIMEOUT,
    PeerTimers,
    Timer,
    jitter,
    needs_rekey_receiving,
    needs_rekey_sending,
)

__all__ = ["Datagram", "Output", "Peer", "WireguardCore"]

Address = tuple[str, int]
_TRANSPORT_TYPE = m.TRANSPORT.to_bytes(4, "little")
MAX_STAGED = 128
# Under load: more handshake messages in one second than this. The interface then stays
# under load for UNDER_LOAD_AFTER_TIME and answers initiations lacking a valid mac2 with a
# cookie reply instead of doing Diffie-Hellman (wireguard-go's trigger is its handshake queue
# reaching 1/8 full; a rate is the sans-IO equivalent).
UNDER_LOAD_HANDSHAKES_PER_SECOND = 128
UNDER_LOAD_AFTER_TIME = 1.0
# Under load, even handshakes with a valid cookie are limited per source address (a token
# bucket: 20 a second, bursts of 5), as wireguard-go's ratelimiter does.
RATE_PER_SOURCE = 20.0
RATE_BURST = 5.0


class Datagram(NamedTuple):
    """One datagram for `to`, or with `segment` a UDP GSO train of them: `data` is then
    datagrams of `segment` bytes back to back, the last maybe shorter (`pieces`)."""

    data: Buffer
    to: Address
    segment: int = 0

    def pieces(self) -> list[bytes]:
        """Each datagram on its own."""
        seg, data = self.segment, self.data
        if not seg or len(data) <= seg:
            return [bytes(data)]
        return [bytes(data[k:k + seg]) for k in range(0, len(data), seg)]


@dataclass(slots=True)
class Output:
    """What one call asks the shell to do."""

    datagrams: list[Datagram] = field(default_factory=list)
    packets: list[bytes] = field(default_factory=list)  # authenticated IP packets for the TUN

    def extend(self, other: Output) -> None:
        self.datagrams += other.datagrams
        self.packets += other.packets


class Peer:
    def __init__(self, local: StaticIdentity, public_key: bytes, preshared_key: bytes) -> None:
        self.public_key = public_key
        self.handshake = Handshake(local, public_key, preshared_key)
        self.session = Session()
        self.timers = PeerTimers()
        self.endpoint: Address | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake_ns = 0
        self.staged: collections.deque[bytes] = collections.deque(maxlen=MAX_STAGED)
        self.owner = 0  # the worker whose socket this peer's datagrams reach (multi-worker)

    def __repr__(self) -> str:
        return f"Peer({self.public_key.hex()[:8]}…, endpoint={self.endpoint})"


def _ip_destination(packet: Buffer) -> Buffer | None:
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        return packet[16:20]
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        return packet[24:40]
    return None


class WireguardCore:
    def __init__(self, private_key: bytes, *, random: Callable[[int], bytes] = os.urandom,
                 wall_clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.identity = StaticIdentity(private_key)
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self.drops: collections.Counter[str] = collections.Counter()
        self.under_load = False  # forced on (tests, operators) or detected by rate
        self._load_window = (0.0, 0)  # (start of the current second, handshakes in it)
        self._under_load_until = float("-inf")
        self._buckets: dict[str, tuple[float, float]] = {}  # source host -> (tokens, at)
        self.mtu: int | None = None
        self._indexes: dict[int, Peer] = {}
        self._random = random
        self._wall_ns = wall_clock_ns
        # Hooks for a multi-worker shell (all optional): indexes are chosen so that
        # index % index_modulus == peer.owner (the worker that will decrypt under it), send
        # counters come from `counters_for(keypair)`, and `on_session` hears of every keypair.
        self.index_modulus = 1
        self.counters_for: Callable[[Keypair], CounterBlocks] | None = None
        self.on_session: Callable[[Peer, TransportKeys], None] | None = None
        # a worker's core does no handshakes: it records the peers that want one instead
        self.handshakes = True
        self.wants_handshake: set[bytes] = set()
        self._via: int | None = None

    # -- configuration -----------------------------------------------------------------
    def add_peer(self, public_key: bytes, *, preshared_key: bytes = bytes(32),
                 allowed_ips: tuple[str, ...] = (), endpoint: Address | None = None) -> Peer:
        peer = Peer(self.identity, public_key, preshared_key)
        peer.endpoint = endpoint
        self.peers[public_key] = peer
        for prefix in allowed_ips:
            self.allowed_ips.insert(prefix, peer)
        return peer

    def remove_peer(self, peer: Peer) -> None:
        self.peers.pop(peer.public_key, None)
        self.allowed_ips.remove_peer(peer)
        for index in [i for i, p in self._indexes.items() if p is peer]:
            del self._indexes[index]

    def _drop(self, drop: m.Drop) -> Output:
        self.drops[drop.reason.value] += 1
        return Output()

    def _new_index(self, peer: Peer) -> int:
        mod = self.index_modulus
        while True:
            index = int.from_bytes(self._random(4), "little")
            index = index - index % mod + peer.owner % mod
            if index and index < 1 << 32 and index not in self._indexes:
                self._indexes[index] = peer
                return index

    def _forget_index(self, index: int) -> None:
        self._indexes.pop(index, None)

    # -- handshakes --------------------------------------------------------------------
    def initiate(self, peer: Peer, now: float, *, force: bool = False) -> Output:
        """A handshake initiation to `peer` (none if one went out less than REKEY_TIMEOUT ago)."""
        if peer.endpoint is None:
            return self._drop(m.Drop(m.DropReason.NO_ROUTE, "peer has no endpoint"))
        if not self.handshakes:
            self.wants_handshake.add(peer.public_key)
            return Output()
        if not force and now - peer.handshake.last_sent < REKEY_TIMEOUT:
            return Output()
        self._forget_index(peer.handshake.local_index)
        data = peer.handshake.create_initiation(self._new_index(peer), tai64n(self._wall_ns()),
                                                now)
        peer.tx_bytes += len(data)
        peer.timers.on_handshake_initiated(now, jitter())
        peer.timers.on_authenticated_traversal(now)
        peer.timers.on_authenticated_sent()
        return Output([Datagram(data, peer.endpoint)])

    def _begin_session(self, peer: Peer, keypair: Keypair, now: float) -> None:
        before = {k.keypair.local_index for k in (peer.session.current, peer.session.previous,
                                                  peer.session.next) if k is not None}
        counters = self.counters_for(keypair) if self.counters_for is not None else None
        keys = peer.session.install(keypair, counters)
        after = {k.keypair.local_index for k in (peer.session.current, peer.session.previous,
                                                 peer.session.next) if k is not None}
        for gone in before - after:
            self._forget_index(gone)
        self._indexes[keypair.local_index] = peer
        peer.timers.on_session_derived(now)
        if self.on_session is not None:
            self.on_session(peer, keys)

    def install_keypair(self, peer: Peer, keypair: Keypair, counters: CounterBlocks) -> None:
        """A keypair another process derived (a worker mirrors the main process's sessions)."""
        before = {k.keypair.local_index for k in (peer.session.current, peer.session.previous,
                                                  peer.session.next) if k is not None}
        peer.session.install(keypair, counters)
        after = {k.keypair.local_index for k in (peer.session.current, peer.session.previous,
                                                 peer.session.next) if k is not None}
        for gone in before - after:
            self._forget_index(gone)
        self._indexes[keypair.local_index] = peer

    def confirm(self, peer: Peer, local_index: int, now: float) -> Output:
        """The first data under our responder keypair arrived at another worker: promote it,
        the handshake is complete, and what waited for it goes out."""
        if not peer.session.promote(local_index):
            return Output()
        self._handshake_done(peer, now)
        return self._flush_staged(peer, now)

    def _handshake_done(self, peer: Peer, now: float) -> None:
        peer.timers.on_handshake_complete(now)
        peer.last_handshake_ns = self._wall_ns()

    def _count_handshake(self, now: float) -> None:
        start, count = self._load_window
        if now - start >= 1.0:
            start, count = now, 0
        count += 1
        self._load_window = (start, count)
        if count > UNDER_LOAD_HANDSHAKES_PER_SECOND:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME

    def is_under_load(self, now: float) -> bool:
        return self.under_load or now < self._under_load_until

    def _check_macs(self, data: bytes, msg: m.Initiation | m.Response, src: Address,
                    now: float) -> Output | None:
        """None when the message may be processed; else the cookie reply (or nothing)."""
        if not self.identity.cookies.check_mac1(data):
            return self._drop(m.Drop(m.DropReason.BAD_MAC1))
        if self.is_under_load(now) and not self.identity.cookies.check_mac2(
                data, source_bytes(*src), now):
            self.drops[m.DropReason.UNDER_LOAD.value] += 1
            reply = self.identity.cookies.create_reply(data, msg.sender, source_bytes(*src), now)
            return Output([Datagram(reply.pack(), src)])
        if self.is_under_load(now) and not self._allow(src[0], now):
            return self._drop(m.Drop(m.DropReason.RATE_LIMITED))
        return None

    def _allow(self, host: str, now: float) -> bool:
        if len(self._buckets) > 4096:  # forget idle sources (a full bucket is the default)
            self._buckets = {h: b for h, b in self._buckets.items() if now - b[1] < 1.0}
        tokens, at = self._buckets.get(host, (RATE_BURST, now))
        tokens = min(RATE_BURST, tokens + (now - at) * RATE_PER_SOURCE)
        allowed = tokens >= 1.0
        self._buckets[host] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    # -- the datagram path -------------------------------------------------------------
    def receive(self, data: bytes, src: Address, now: float, *, via: int | None = None) -> Output:
        """One datagram from `src`; `via`: the worker whose socket received it (the peer's
        next receive index is then chosen for that worker)."""
        self._via = via
        msg = m.parse(data)
        if isinstance(msg, m.Drop):
            return self._drop(msg)
        if isinstance(msg, m.Transport):
            return self._receive_transports(msg.receiver, [bytes(data)], src, now)
        if isinstance(msg, m.CookieReply):
            return self._receive_cookie(msg, now)
        self._count_handshake(now)
        refused = self._check_macs(data, msg, src, now)
        if refused is not None:
            return refused
        if isinstance(msg, m.Initiation):
            return self._receive_initiation(msg, len(data), src, now)
        return self._receive_response(msg, len(data), src, now)

    def _handshake_of(self, public_key: bytes) -> Handshake | None:
        peer = self.peers.get(public_key)
        return peer.handshake if peer is not None else None

    def _receive_initiation(self, msg: m.Initiation, size: int, src: Address,
                            now: float) -> Output:
        result = consume_initiation(self.identity, msg, self._handshake_of, now)
        if isinstance(result, m.Drop):
            return self._drop(result)
        peer = self.peers[result.remote_static]
        if self._via is not None:
            peer.owner = self._via
        peer.rx_bytes += size
        peer.endpoint = src
        self._forget_index(peer.handshake.local_index)
        index = self._new_index(peer)
        response, keypair = peer.handshake.create_response(index, now)
        self._begin_session(peer, keypair, now)
        peer.tx_bytes += len(response)
        peer.timers.on_authenticated_traversal(now)
        peer.timers.on_authenticated_sent()
        return Output([Datagram(response, src)])

    def _receive_response(self, msg: m.Response, size: int, src: Address, now: float) -> Output:
        peer = self._indexes.get(msg.receiver)
        if peer is None:
            return self._drop(m.Drop(m.DropReason.UNKNOWN_INDEX))
        result = peer.handshake.consume_response(msg, now)
        if isinstance(result, m.Drop):
            return self._drop(result)
        peer.rx_bytes += size
        peer.endpoint = src
        self._begin_session(peer, result, now)
        self._handshake_done(peer, now)
        peer.timers.on_authenticated_received()
        peer.timers.on_authenticated_traversal(now)
        out = self._flush_staged(peer, now)
        if not out.datagrams:  # confirm the keys at once: the responder waits for this
            out.extend(self.keepalive(peer, now))
        return out

    def _receive_cookie(self, msg: m.CookieReply, now: float) -> Output:
        peer = self._indexes.get(msg.receiver)
        if peer is None:
            return self._drop(m.Drop(m.DropReason.UNKNOWN_INDEX))
        if not peer.handshake.cookies.consume_reply(msg, now):
            return self._drop(m.Drop(m.DropReason.NO_COOKIE_EXPECTED))
        return Output()

    def receive_batch(self, datagrams: Sequence[tuple[bytes, Address]], now: float, *,
                      via: int | None = None) -> Output:
        """Datagrams read together (a GRO train, one drain of the socket), in order: each run
        of transport messages from one source under one receiver index is opened in one go
        (the keys found once, the timers run once); anything else goes through `receive`."""
        out = Output()
        i, n = 0, len(datagrams)
        while i < n:
            data, src = datagrams[i]
            if len(data) < m.KEEPALIVE_SIZE or data[:4] != _TRANSPORT_TYPE:
                out.extend(self.receive(data, src, now, via=via))
                i += 1
                continue
            head = data[:8]  # the type and the receiver index
            j = i + 1
            while j < n:
                d, s = datagrams[j]
                if d[:8] != head or s != src or len(d) < m.KEEPALIVE_SIZE:
                    break
                j += 1
            out.extend(self._receive_transports(int.from_bytes(head[4:], "little"),
                                                [d for d, _ in datagrams[i:j]], src, now))
            i = j
        return out

    def _receive_transports(self, receiver: int, messages: list[bytes], src: Address,
                            now: float) -> Output:
        """Transport messages from `src` under one receiver index (whole datagrams)."""
        peer = self._indexes.get(receiver)
        if peer is None:
            self.drops[m.DropReason.UNKNOWN_INDEX.value] += len(messages)
            return Output()
        was_next = peer.session.next
        opened = peer.session.open_many(receiver, messages, now)
        if isinstance(opened, m.Drop):
            self.drops[opened.reason.value] += len(messages)
            return Output()
        keys, plains, refused = opened
        for drop in refused:
            self.drops[drop.reason.value] += 1
        if not plains:
            return Output()
        out = Output()
        if was_next is keys:  # key confirmation of the handshake we answered
            self._handshake_done(peer, now)
            out.extend(self._flush_staged(peer, now))
        peer.endpoint = src  # roaming: the last authenticated source is where the peer is
        # (the datagrams' sizes: every opened one is its plaintext plus header and tag)
        peer.rx_bytes += sum(map(len, plains)) + len(plains) * m.KEEPALIVE_SIZE
        peer.timers.on_authenticated_received()
        peer.timers.on_authenticated_traversal(now)
        if needs_rekey_receiving(keys.keypair.is_initiator, now - keys.keypair.created,
                                 peer.timers.sent_last_minute_handshake):
            peer.timers.sent_last_minute_handshake = True
            out.extend(self.initiate(peer, now))
        packets = out.packets
        allowed: dict[bytes, bool] = {}
        data_seen = False
        for plain in plains:
            n = len(plain)
            if not n:  # keepalive
                continue
            data_seen = True
            # the IP source and length (inline: this runs for every packet received)
            version = plain[0] >> 4
            if version == 4 and n >= 20:
                source, length = plain[12:16], (plain[2] << 8) | plain[3]
            elif version == 6 and n >= 40:
                source, length = plain[8:24], 40 + ((plain[4] << 8) | plain[5])
            else:
                length = n + 1
            if length > n:
                self.drops[m.DropReason.BAD_LENGTH.value] += 1
                continue
            ok = allowed.get(source)
            if ok is None:
                ok = allowed[source] = self.allowed_ips.allows(peer, source)
            if not ok:
                self.drops[m.DropReason.NOT_ALLOWED_SOURCE.value] += 1
                continue
            packets.append(plain if length == n else plain[:length])
        if data_seen:
            peer.timers.on_data_received(now)
        return out

    def _merge_drop(self, out: Output, drop: m.Drop) -> Output:
        self.drops[drop.reason.value] += 1
        return out

    # -- the TUN path ------------------------------------------------------------------
    def send(self, packet: bytes, now: float) -> Output:
        """One IP packet read from the TUN -> the datagrams that carry it (or a handshake)."""
        return self.send_batch([packet], now)

    def send_batch(self, packets: Sequence[Buffer], now: float) -> Output:
        """Packets with one destination (a super-packet's segments), routed once by the first:
        the datagrams that carry them, or a handshake."""
        dst = _ip_destination(packets[0]) if packets else None
        peer = self.allowed_ips.lookup(dst) if dst is not None else None
        if peer is None:
            self.drops[m.DropReason.NO_ROUTE.value] += len(packets)
            return Output()
        return self.send_many(peer, packets, now)

    def send_to(self, peer: Peer, packet: bytes, now: float) -> Output:
        return self.send_many(peer, [packet], now)

    def send_many(self, peer: Peer, packets: Sequence[Buffer], now: float) -> Output:
        """IP packets for `peer` (b"" is a keepalive) -> their transport datagrams, in order
        (as GSO trains: `Datagram.segment`), with the peer's timers and rekey check run once
        for the batch (a TSO super-packet's segments arrive together). Without a usable
        session they are staged for the handshake this starts."""
        if peer.endpoint is None:
            self.drops[m.DropReason.NO_ROUTE.value] += len(packets)
            return Output()
        current = peer.session.current
        if current is None or now - current.keypair.created >= REJECT_AFTER_TIME:
            peer.staged.extend(bytes(p) for p in packets if p)
            return self.initiate(peer, now)
        sealed = peer.session.seal_many(packets, now, mtu=self.mtu)
        if isinstance(sealed, m.Drop):
            self.drops[sealed.reason.value] += len(packets)
            return Output()
        to = peer.endpoint
        peer.tx_bytes += sum(len(train) for train, _ in sealed)
        out = Output([Datagram(train, to, segment) for train, segment in sealed])
        if any(packets):
            peer.timers.on_data_sent(now, jitter())
        peer.timers.on_authenticated_sent()
        peer.timers.on_authenticated_traversal(now)
        if needs_rekey_sending(current.counters.issued, current.keypair.is_initiator,
                               now - current.keypair.created):
            out.extend(self.initiate(peer, now))
        return out

    def keepalive(self, peer: Peer, now: float) -> Output:
        return self.send_to(peer, b"", now)

    def _flush_staged(self, peer: Peer, now: float) -> Output:
        if not peer.staged:
            return Output()
        packets = list(peer.staged)
        peer.staged.clear()
        return self.send_many(peer, packets, now)

    # -- timers ------------------------------------------------------------------------
    def tick(self, now: float) -> Output:
        """Run the timers due at `now` for every peer."""
        out = Output()
        for peer in list(self.peers.values()):
            for timer in peer.timers.expired(now):
                if timer is Timer.RETRANSMIT_HANDSHAKE:
                    if peer.timers.on_retransmit(now):
                        out.extend(self.initiate(peer, now, force=True))
                    else:
                        peer.staged.clear()
                elif timer is Timer.SEND_KEEPALIVE:
                    out.extend(self.keepalive(peer, now))
                    peer.timers.on_keepalive_sent(now)
                elif timer is Timer.NEW_HANDSHAKE:
                    out.extend(self.initiate(peer, now))
                elif timer is Timer.ZERO_KEY_MATERIAL:
                    peer.session.clear()
                elif timer is Timer.PERSISTENT_KEEPALIVE:
                    out.extend(self.keepalive(peer, now))
        return out

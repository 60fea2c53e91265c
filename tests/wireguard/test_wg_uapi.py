"""The configuration protocol: set/get against the object model, and against the real tools.

The differential tests run Debian's `wg` (wireguard-tools) against our ControlSocket, and read
Debian's wireguard-go's own get answer with our parser: the same bytes on the wire both ways.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator

import pytest
from wg_peer import WireguardGo, b64, need_wireguard_go

from mqtun.netns import NetNamespace
from mqtun.wireguard.control import ControlSocket
from mqtun.wireguard.crypto import public_key
from mqtun.wireguard.uapi import (
    DeviceConfig,
    RequestReader,
    SetResult,
    UapiRequest,
    apply_set,
    format_get,
    parse_get,
)

PRIV = bytes.fromhex("a8" * 31 + "40")
PEER1 = public_key(bytes.fromhex("b0" * 31 + "50"))
PEER2 = public_key(bytes.fromhex("c0" * 31 + "60"))


def _set(config: DeviceConfig, *lines: str) -> SetResult:
    return apply_set(config, "".join(line + "\n" for line in lines))


def test_set_then_get() -> None:
    config = DeviceConfig()
    result = _set(config, f"private_key={PRIV.hex()}", "listen_port=51820", "fwmark=7",
                  f"public_key={PEER1.hex()}", f"preshared_key={'11' * 32}",
                  "endpoint=[fd00::2]:51821", "persistent_keepalive_interval=25",
                  "replace_allowed_ips=true", "allowed_ip=198.19.0.7/24", "allowed_ip=fd00::/64",
                  "protocol_version=1")
    assert result.errno == 0 and result.private_key_changed and result.listen_port_changed
    assert result.peers_changed == {PEER1} and result.keepalive_turned_on == {PEER1}
    peer = config.peers[PEER1]
    assert peer.endpoint == ("fd00::2", 51821) and peer.persistent_keepalive_interval == 25
    assert peer.allowed_ips == [ipaddress.ip_network("198.19.0.0/24"),
                                ipaddress.ip_network("fd00::/64")]
    text = format_get(config)
    assert text.startswith(f"private_key={PRIV.hex()}\nlisten_port=51820\nfwmark=7\n")
    assert "endpoint=[fd00::2]:51821\n" in text and "allowed_ip=198.19.0.0/24\n" in text
    assert format_get(parse_get(text)) == text
    assert PRIV.hex() not in repr(config)


def test_errors_change_nothing() -> None:
    config = DeviceConfig()
    _set(config, "listen_port=1", f"public_key={PEER1.hex()}")
    for bad in (["listen_port=65536"], ["nonsense"], ["private_key=abc"],
                [f"public_key={PEER2.hex()}", "allowed_ip=300.1.1.1/8"],
                [f"public_key={PEER2.hex()}", "endpoint=198.18.0.1"],
                [f"public_key={PEER2.hex()}", "protocol_version=2"],
                ["replace_peers=false"], [f"public_key={PEER2.hex()}", "frobnicate=1"]):
        before = format_get(config)
        result = _set(config, "listen_port=9", *bad)
        assert result.errno < 0, bad
        assert format_get(config) == before  # all or nothing


def test_peer_operations() -> None:
    config = DeviceConfig()
    _set(config, f"public_key={PEER1.hex()}", "allowed_ip=198.19.0.0/24",
         f"public_key={PEER2.hex()}", "allowed_ip=198.19.1.0/24")
    _set(config, f"public_key={PEER2.hex()}", "allowed_ip=198.19.0.0/24")  # moves it
    assert config.peers[PEER1].allowed_ips == []
    _set(config, f"public_key={PEER2.hex()}", "allowed_ip=-198.19.1.0/24")
    assert config.peers[PEER2].allowed_ips == [ipaddress.ip_network("198.19.0.0/24")]
    fresh = public_key(os.urandom(32))
    _set(config, f"public_key={fresh.hex()}", "update_only=true", "allowed_ip=10.0.0.0/8")
    assert fresh not in config.peers             # update_only never creates
    result = _set(config, f"public_key={PEER1.hex()}", "remove=true")
    assert result.peers_removed == {PEER1} and PEER1 not in config.peers
    result = _set(config, "replace_peers=true", f"public_key={PEER1.hex()}")
    assert set(config.peers) == {PEER1} and PEER2 in result.peers_removed
    _set(config, f"private_key={PRIV.hex()}", f"public_key={public_key(PRIV).hex()}")
    assert public_key(PRIV) not in config.peers  # our own key is never a peer
    _set(config, f"private_key={'00' * 32}")
    assert config.private_key is None


def test_request_framing() -> None:
    reader = RequestReader()
    assert reader.feed(b"get=1\n") == []
    assert reader.feed(b"\nset=1\nlisten_port=1\n") == [UapiRequest("get")]
    assert reader.feed(b"\nget=1\n\n") == [UapiRequest("set", "listen_port=1\n"),
                                          UapiRequest("get")]
    assert reader.feed(b"hello=1\n\n") == [UapiRequest("invalid")]


# -- against the real tools --------------------------------------------------------------

class _ConfigHandler:
    def __init__(self) -> None:
        self.config = DeviceConfig()
        self.lock = threading.Lock()

    def get(self) -> str:
        with self.lock:
            return format_get(self.config)

    def set(self, body: str) -> SetResult:
        with self.lock:
            return apply_set(self.config, body)


@pytest.fixture
def served(netns: NetNamespace) -> Iterator[tuple[str, _ConfigHandler, ControlSocket]]:
    need_wireguard_go()
    name = f"wgmq{uuid.uuid4().hex[:8]}"
    handler = _ConfigHandler()
    control = ControlSocket(name, handler)
    stop = threading.Event()
    thread = threading.Thread(target=control.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield name, handler, control
    finally:
        stop.set()
        thread.join(timeout=5)
        control.close()


def _wg(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["wg", *args], capture_output=True, text=True, timeout=10, input=stdin)


def test_wg_tools_drive_our_socket(served: tuple[str, _ConfigHandler, ControlSocket],
                                   tmp_path: object) -> None:
    name, handler, control = served
    assert stat.S_IMODE(os.stat(control.path).st_mode) == 0o600
    key_file, psk_file = f"{tmp_path}/priv", f"{tmp_path}/psk"
    for path, key in ((key_file, PRIV), (psk_file, bytes(range(32)))):
        with open(path, "w") as f:
            f.write(b64(key) + "\n")
    done = _wg("set", name, "private-key", key_file, "listen-port", "51999", "fwmark", "0x10",
               "peer", b64(PEER1), "preshared-key", psk_file, "endpoint", "198.18.0.2:51820",
               "allowed-ips", "198.19.0.0/24,fd00::/64", "persistent-keepalive", "25")
    assert done.returncode == 0, done.stderr
    config = handler.config
    assert (config.private_key, config.listen_port, config.fwmark) == (PRIV, 51999, 16)
    peer = config.peers[PEER1]
    assert peer.preshared_key == bytes(range(32)) and peer.endpoint == ("198.18.0.2", 51820)
    assert [str(n) for n in peer.allowed_ips] == ["198.19.0.0/24", "fd00::/64"]
    peer.rx_bytes, peer.tx_bytes, peer.last_handshake_time_ns = 1234, 5678, 1_700_000_000 * 10**9
    dump = _wg("show", name, "dump").stdout.splitlines()
    assert dump[0].split("\t") == [b64(PRIV), b64(public_key(PRIV)), "51999", "0x10"]
    assert dump[1].split("\t") == [b64(PEER1), b64(bytes(range(32))), "198.18.0.2:51820",
                                   "198.19.0.0/24,fd00::/64", "1700000000", "1234", "5678", "25"]
    # setconf replaces the whole configuration (here without a private key: it is removed)
    conf = f"[Interface]\nListenPort = 4000\n\n[Peer]\nPublicKey = {b64(PEER2)}\n" \
           "AllowedIPs = 198.19.9.0/24\n"
    assert _wg("setconf", name, "/dev/stdin", stdin=conf).returncode == 0
    assert set(config.peers) == {PEER2} and config.listen_port == 4000
    assert _wg("set", name, "peer", b64(PEER2), "remove").returncode == 0
    assert config.peers == {}
    assert config.private_key is None and _wg("show", name, "public-key").stdout == "(none)\n"
    assert _wg("set", name, "private-key", key_file).returncode == 0
    assert base64.b64decode(_wg("show", name, "public-key").stdout.strip()) == public_key(PRIV)


def test_our_parser_reads_wireguard_go(netns: NetNamespace, make_netns: object) -> None:
    need_wireguard_go()
    with WireguardGo(netns, PRIV, 51820) as wg:
        wg.add_peer(PEER1, allowed_ips="198.19.0.0/24,fd00::/64", endpoint="198.18.0.2:51821",
                    preshared_key=bytes(range(32)), keepalive=25)
        wg.add_peer(PEER2, allowed_ips="198.19.1.1/32")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(wg.socket)
            s.sendall(b"get=1\n\n")
            answer = b""
            while not answer.endswith(b"\n\n"):
                chunk = s.recv(65536)
                assert chunk
                answer += chunk
    text = answer.decode()
    assert text.endswith("errno=0\n\n")
    body = text[: -len("errno=0\n\n")]
    config = parse_get(body)
    assert config.private_key == PRIV and config.listen_port == 51820
    assert config.peers[PEER1].persistent_keepalive_interval == 25
    assert sorted(format_get(config).splitlines()) == sorted(body.splitlines())

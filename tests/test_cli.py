"""The `mqtun` command: create/delete/show, exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mqtun import Device, find_link, list_tun_links
from mqtun.device import ClassicFilter


def mqtun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mqtun", *args], capture_output=True,
                          text=True, timeout=60)


def test_create_show_delete() -> None:
    out = mqtun("create", "cli%d", "--multi-queue", "--tap", "--vnet-hdr", "--owner", "nobody")
    assert out.returncode == 0, out.stderr
    name = out.stdout.strip()
    assert name == "cli0"
    info = find_link(name)
    assert info and info.persist and info.multi_queue and info.kind == "tap" and info.vnet_hdr
    assert info.owner == 65534
    with Device.attach(name, 2):
        shown = mqtun("show", name)
        assert shown.returncode == 0
        assert "cli0: tap" in shown.stdout and "2 active, 0 disabled" in shown.stdout
        assert "held by pid" in shown.stdout
        data = json.loads(mqtun("show", "--json").stdout)
        (entry,) = [d for d in data if d["name"] == name]
        assert entry["num_queues"] == 2 and entry["owner"] == 65534
        assert len(entry["holders"]) == 2 and entry["holders"][0]["fd"] > 2
    assert mqtun("delete", name).returncode == 0
    assert find_link(name) is None


def test_show_tells_the_classic_filter_the_kernel_reports() -> None:
    """TUNGETFILTER keeps the last program after a detach; only IFF_NOFILTER (the IFF_NO_PI
    bit) tells whether one is attached, so a packet-info TAP shows it and a plain one cannot."""
    from mqtun.steer import filters

    prog = filters.classic_only_ipv4()
    n = len(prog.code) // 8
    with Device.create("flt%d", 2, tap=True, packet_info=True) as tap, \
            Device.create("flnopi%d", tap=True) as nopi, Device.create("fltun%d") as tun:
        assert mqtun("show", tap.name).stdout.count("filters: classic BPF none;") == 1
        for d in (tap, nopi):
            d.attach_classic_filter(prog.code)
        assert tap.classic_filter == ClassicFilter(n, True)
        assert nopi.classic_filter == ClassicFilter(n, None)
        shown = mqtun("show", tap.name)
        assert shown.returncode == 0, shown.stderr
        assert f"filters: classic BPF {n} instructions; eBPF steering/filter not reported" \
            in shown.stdout
        (entry,) = json.loads(mqtun("show", "--json", tap.name).stdout)
        assert [h["classic_filter"] for h in entry["holders"]] == \
            [{"instructions": n, "attached": True}] * 2
        assert "unless detached since" in mqtun("show", nopi.name).stdout
        tap.detach_classic_filter()
        assert tap.classic_filter == ClassicFilter(n, False)
        assert "filters: classic BPF none;" in mqtun("show", tap.name).stdout
        assert "filters: eBPF steering/filter not reported" in mqtun("show", tun.name).stdout


def test_show_lists_other_tools_devices() -> None:
    subprocess.run(["ip", "tuntap", "add", "iptap0", "mode", "tap"], check=True, timeout=10)
    out = mqtun("show")
    assert out.returncode == 0 and "iptap0: tap" in out.stdout and "persist" in out.stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("create", "x" * 20), 2, "at most 15"),
        (("create", "a/b"), 2, "'/'"),
        (("delete", "nosuch0"), 1, "no tun/tap device named nosuch0"),
        (("show", "nosuch0"), 1, "no tun/tap device named nosuch0"),
        (("delete", "lo"), 2, "not a tun/tap device"),
        (("frobnicate",), 2, "invalid choice"),
        ((), 2, "required"),
    ],
)
def test_errors_are_one_line_with_the_right_code(args: tuple[str, ...], code: int,
                                                 words: str) -> None:
    out = mqtun(*args)
    assert out.returncode == code
    assert words in out.stderr
    assert "Traceback" not in out.stderr


def test_create_existing_is_refused_with_exit_1() -> None:
    assert mqtun("create", "ex0").returncode == 0
    out = mqtun("create", "ex0")
    assert out.returncode == 1 and "already exists" in out.stderr
    assert "Traceback" not in out.stderr
    # a command line user is told commands, not the Python API
    assert "Device.attach" not in out.stderr, out.stderr
    assert "`mqtun delete ex0`" in out.stderr and "ex%d" in out.stderr
    fwd = mqtun("forward", "ex0", "other0")
    assert fwd.returncode == 1 and "Device.attach" not in fwd.stderr, fwd.stderr
    assert "--attach" in fwd.stderr and fwd.stderr.count("\n") == 1
    mqtun("delete", "ex0")


def test_a_pattern_needs_a_prefix() -> None:
    """`%d` alone made a device named `0`."""
    for pattern in ("%d", "1%d"):
        out = mqtun("create", pattern)
        assert out.returncode == 2 and "prefix" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert list_tun_links() == []
    assert mqtun("create", "p%d").stdout.strip() == "p0"


def test_show_counts_the_queue_of_a_single_queue_device() -> None:
    """The kernel reports queue counts for multiqueue devices only: show said `? active`."""
    name = mqtun("create", "one%d").stdout.strip()
    shown = mqtun("show", name).stdout
    assert "queues: 0 active, 0 disabled" in shown, shown
    with Device.attach(name):
        shown = mqtun("show", name).stdout
        assert "queues: 1 active, 0 disabled" in shown, shown
        (entry,) = json.loads(mqtun("show", "--json", name).stdout)
        assert (entry["num_queues"], entry["num_disabled_queues"]) == (1, 0)
    assert "?" not in mqtun("show").stdout


@pytest.mark.parametrize(("option", "value"), [("--spin-us", "-5"), ("--batch", "0"),
                                               ("--batch", "5000"), ("--spin-us", "2000000")])
def test_loop_options_are_checked_in_their_own_names(option: str, value: str) -> None:
    out = mqtun("forward", option, value, "a0", "b0")
    assert out.returncode == 2
    assert f"argument {option}:" in out.stderr and "must be" in out.stderr
    assert "spin_us" not in out.stderr and "batch must" not in out.stderr, out.stderr
    assert list_tun_links() == []


def test_help_shows_every_default() -> None:
    """Every option with a default names it in --help, in every subcommand (new ones too)."""
    import argparse

    from mqtun.cli import build_parser

    def commands(parser: argparse.ArgumentParser, name: str):  # type: ignore[no-untyped-def]
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, child in action.choices.items():
                    yield from commands(child, f"{name} {sub_name}")

    checked = 0
    for name, command in commands(build_parser(), "mqtun"):
        text = " ".join(command.format_help().split())  # unwrapped
        for action in command._actions:
            if (action.option_strings and action.nargs != 0
                    and action.default not in (None, argparse.SUPPRESS)):
                shown = f"(default: {action.default})" in text or (
                    "default" in (action.help or ""))  # its help names it in its own words
                assert shown, (name, action.dest)
                checked += 1
    assert checked >= 10
    assert "(default: 64)" in " ".join(mqtun("forward", "--help").stdout.split())


def test_device_deleted_under_forward_is_one_line() -> None:
    """Each worker's `gone` event was printed too: 3 lines (with 2 queues) for one fact."""
    proc = subprocess.Popen([sys.executable, "-m", "mqtun", "forward", "--queues", "2",
                             "gone0", "gone1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "READY queues=2\n"
        subprocess.run(["ip", "link", "del", "gone0"], check=True, timeout=10)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert proc.returncode == 1
    assert err.count("\n") == 1 and "gone0" in err and "stopped" in err, err


def test_console_script_and_version() -> None:
    out = subprocess.run(["mqtun", "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("mqtun ")


def _preload_mqtun() -> None:
    """Import every mqtun module now: the unprivileged child cannot read root's Python tree."""
    import importlib
    import pkgutil

    import mqtun

    for mod in pkgutil.walk_packages(mqtun.__path__, "mqtun."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)


def test_without_cap_net_admin() -> None:
    from nettools import cli_in_process, run_as

    _preload_mqtun()

    code, _, err = run_as("nobody", lambda: cli_in_process(["create", "np0"]))
    assert code == 1 and "CAP_NET_ADMIN" in err and err.count("\n") == 1
    assert find_link("np0") is None, "nothing half-created"
    assert mqtun("create", "held0").returncode == 0
    code, _, err = run_as("nobody", lambda: cli_in_process(["delete", "held0"]))
    assert code == 1 and "held0" in err and "CAP_NET_ADMIN" in err
    assert find_link("held0") is not None
    code, out, _ = run_as("nobody", lambda: cli_in_process(["show", "held0"]))
    assert code == 0 and "held0: tun" in out, "reading needs no privilege"
    assert mqtun("delete", "held0").returncode == 0



def test_permission_denied_on_dev_net_tun_says_what_to_do(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Some machines ship /dev/net/tun 0600: the error said so, but not what to do."""
    import nettools
    from nettools import cli_in_process, run_as

    _preload_mqtun()
    usual_node = nettools._private_tun_node  # run_as's child: its own 0666 node, then drop

    def node_0600() -> None:
        usual_node()
        os.chmod("/dev/net/tun", 0o600)

    monkeypatch.setattr(nettools, "_private_tun_node", node_0600)
    code, _, err = run_as("nobody", lambda: cli_in_process(["create", "perm0"]))
    assert code == 1 and err.count("\n") == 1, err
    assert "permission denied" in err and "chmod 0666 /dev/net/tun" in err, err
    assert find_link("perm0") is None


def _forward_as(user: str, argv: list[str]) -> tuple[int, int]:
    """`mqtun forward ARGV` in a forked child running as `user` (no capabilities), its
    stdout and stderr on one pipe: (pid, read end)."""
    import pwd

    from nettools import _private_tun_node

    pw = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(r)
            _private_tun_node()
            os.setgroups([])
            os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
            os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
            sys.stdout = sys.stderr = os.fdopen(w, "w", buffering=1)
            from mqtun.cli import main

            code = main(["forward", *argv])
            sys.stdout.flush()
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _read_until(fd: int, text: str, timeout: float) -> str:
    import select
    import time

    got = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in got and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            got += chunk
    return got.decode()


def test_forward_attaches_to_persistent_owner_set_devices(make_netns) -> None:  # type: ignore[no-untyped-def]
    """An administrator makes two devices for a user; the user serves them with no
    capability, and they stay when the forwarder ends."""
    import signal
    import socket

    _preload_mqtun()
    for name in ("att0", "att1"):
        out = mqtun("create", name, "--multi-queue", "--vnet-hdr", "--owner", "nobody")
        assert out.returncode == 0, out.stderr
        subprocess.run(["ip", "link", "set", name, "up"], check=True, timeout=10)
    subprocess.run(["ip", "addr", "add", "198.18.1.1/24", "dev", "att0"], check=True,
                   timeout=10)
    pid, r = _forward_as("nobody", ["--attach", "--queues", "2", "att0", "att1"])
    try:
        ready = _read_until(r, "\n", 15)
        assert ready.startswith("READY queues=2"), ready
        ns_b = make_netns()  # moved after READY: the queue fds stay valid
        subprocess.run(["ip", "link", "set", "att1", "netns", ns_b.name], check=True,
                       timeout=10)
        ns_b.run(["ip", "addr", "add", "198.18.1.2/24", "dev", "att1"])
        ns_b.run(["ip", "link", "set", "att1", "up"])
        with ns_b.enter():
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            rx.bind(("198.18.1.2", 5001))
            rx.settimeout(0.2)
            got = None
            for _ in range(25):  # the first datagram may wait for ARP-less TUN: none; retry
                tx.sendto(b"through nobody's forwarder", ("198.18.1.2", 5001))
                try:
                    got = rx.recv(100)
                    break
                except TimeoutError:
                    continue
        assert got == b"through nobody's forwarder"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0, _read_until(r, "\0", 1)
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(r)
    info = find_link("att0")
    assert info is not None and info.persist and info.owner == 65534, "left in place"
    with ns_b.enter():
        assert find_link("att1") is not None
    assert mqtun("delete", "att0").returncode == 0


def test_forward_attach_to_a_link_that_is_down_says_to_bring_it_up() -> None:
    from nettools import cli_in_process, run_as

    _preload_mqtun()
    for name in ("down0", "down1"):
        assert mqtun("create", name, "--multi-queue", "--vnet-hdr", "--owner", "nobody") \
            .returncode == 0
    code, _, err = run_as("nobody", lambda: cli_in_process(
        ["forward", "--attach", "--queues", "2", "down0", "down1"]))
    assert code == 1 and err.count("\n") == 1, err
    assert "ip link set down0 up" in err, err
    assert find_link("down0") is not None and find_link("down1") is not None


@pytest.mark.parametrize(("create", "forward", "words"), [
    (["--multi-queue", "--vnet-hdr"], ["--tap"], "it is a TUN: leave out --tap"),
    (["--multi-queue"], [], "add --no-offload"),
    (["--vnet-hdr"], ["--queues", "2"], "use --queues 1"),
    (["--multi-queue", "--vnet-hdr", "--tap"], [], "add --tap"),
])
def test_forward_attach_says_which_option_fits_the_device(create: list[str], forward: list[str],
                                                          words: str) -> None:
    for name in ("fit0", "fit1"):
        assert mqtun("create", name, *create).returncode == 0
    out = mqtun("forward", "--attach", *forward, "fit0", "fit1")
    assert out.returncode == 2 and words in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1
    assert find_link("fit0") is not None


def test_forward_attach_to_a_missing_device_says_how_to_make_it() -> None:
    assert mqtun("create", "here0", "--vnet-hdr").returncode == 0
    out = mqtun("forward", "--attach", "here0", "nosuch0")
    assert out.returncode == 1 and "`mqtun create nosuch0 " in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1

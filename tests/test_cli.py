"""The `mqtun` command: create/delete/show, exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mqtun import Device, find_link
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
    mqtun("delete", "ex0")


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

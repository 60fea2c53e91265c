"""Text rendering of device descriptions for the terminal."""

from __future__ import annotations

from collections.abc import Sequence

from mqtun.apps.manage import QueueHolder
from mqtun.link import LinkInfo


def render_show(rows: Sequence[tuple[LinkInfo, list[QueueHolder]]]) -> str:
    """`mqtun show` as text: one block per device."""
    if not rows:
        return "no tun/tap devices in this network namespace\n"
    out: list[str] = []
    for info, holders in rows:
        flags = [f for f, on in (("multi_queue", info.multi_queue), ("vnet_hdr", info.vnet_hdr),
                                 ("packet_info", info.packet_info), ("persist", info.persist))
                 if on]
        owner = "-" if info.owner is None else str(info.owner)
        group = "-" if info.group is None else str(info.group)
        state = "UP" if info.up else "DOWN"
        s = info.stats
        out.append(
            f"{info.name}: {info.kind} ifindex {info.ifindex} {state} mtu {info.mtu} "
            f"flags {','.join(flags) or '-'} owner {owner} group {group}\n"
            f"  queues: {_count(info.num_queues)} active, "
            f"{_count(info.num_disabled_queues)} disabled\n"
            f"  read by userspace (tx): {s.get('tx_packets', 0)} packets {s.get('tx_bytes', 0)} "
            f"bytes {s.get('tx_dropped', 0)} dropped\n"
            f"  written by userspace (rx): {s.get('rx_packets', 0)} packets "
            f"{s.get('rx_bytes', 0)} bytes {s.get('rx_dropped', 0)} dropped "
            f"{s.get('rx_frame_errors', 0)} frame errors\n"
        )
        if holders:
            for h in holders:
                out.append(f"  held by pid {h.pid} fd {h.fd}: {h.command}\n")
        else:
            out.append("  held by: no process (attached queues: none)\n")
    return "".join(out)


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)

"""Text rendering of device descriptions for the terminal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mqtun.apps.manage import LiveQueue, QueueHolder
from mqtun.link import LinkInfo


def render_show(rows: Sequence[tuple[LinkInfo, list[QueueHolder]]],
                live: Mapping[str, Sequence[LiveQueue]] | None = None) -> str:
    """`mqtun show` as text: one block per device, with the live per-queue counters of the
    mqtun processes serving it (`live`, from `live_queues()`)."""
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
        out.append(f"  filters: {_filters(info, holders)}\n")
        if holders:
            for h in holders:
                out.append(f"  held by pid {h.pid} fd {h.fd}: {h.command}\n")
        else:
            out.append("  held by: no process (attached queues: none)\n")
        out.extend(_live_lines((live or {}).get(info.name, ())))
    return "".join(out)


def _live_lines(queues: Sequence[LiveQueue]) -> list[str]:
    out: list[str] = []
    seen: set[tuple[int, str]] = set()
    for q in queues:
        if (q.pid, q.region) not in seen:
            seen.add((q.pid, q.region))
            out.append(f"  live counters from mqtun pid {q.pid} ({q.region}):\n")
        e, s = q.info, q.info.stats
        cpu = "-" if e.cpu is None else str(e.cpu)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.dropped.items()))
        out.append(
            f"    queue {e.queue}: worker {e.worker_pid} {e.state.label} cpu {cpu} "
            f"restarts {e.restarts}; read {s.read_packets} packets {s.read_bytes} bytes, "
            f"written {s.written_packets} packets {s.written_bytes} bytes, "
            f"{s.dropped_total} dropped{f' ({reasons})' if reasons else ''}\n"
        )
    return out


def _filters(info: LinkInfo, holders: Sequence[QueueHolder]) -> str:
    """What the kernel tells about the device's filters: a TAP's classic BPF filter, through
    a holder's queue fd (TUNGETFILTER); eBPF steering and filter programs it never reports."""
    ebpf = "eBPF steering/filter not reported by the kernel"
    if info.kind != "tap":
        return ebpf
    known = [h.classic_filter for h in holders if h.classic_filter is not None]
    if not known:
        classic = "classic BPF unknown (no queue to ask)"
    elif known[0].attached is False:
        classic = "classic BPF none"
    elif known[0].attached:
        classic = f"classic BPF {known[0].instructions} instructions"
    else:
        classic = (f"classic BPF {known[0].instructions} instructions, unless detached since "
                   "(IFF_NO_PI hides which)")
    return f"{classic}; {ebpf}"


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)

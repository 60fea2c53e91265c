"""The Linux kernel ABI that mqtun speaks: ioctl numbers, flags and struct layouts.

This is the only module that spells a kernel number. Values are x86_64/generic Linux, from
include/uapi/linux/if_tun.h, virtio_net.h, bpf.h and filter.h (see ../shared/KERNEL_TUN.md).
"""

from __future__ import annotations

import errno
import platform
import struct
from typing import Final

TUN_DEVICE_PATH: Final = "/dev/net/tun"
IFNAMSIZ: Final = 16  # including the NUL: names are at most 15 bytes
MAX_QUEUES: Final = 256  # MAX_TAP_QUEUES, counting disabled queues

# --- ioctls on /dev/net/tun -------------------------------------------------------------------
TUNSETNOCSUM: Final = 0x400454C8
TUNSETDEBUG: Final = 0x400454C9
TUNSETIFF: Final = 0x400454CA
TUNSETPERSIST: Final = 0x400454CB
TUNSETOWNER: Final = 0x400454CC
TUNSETLINK: Final = 0x400454CD
TUNSETGROUP: Final = 0x400454CE
TUNGETFEATURES: Final = 0x800454CF
TUNSETOFFLOAD: Final = 0x400454D0
TUNSETTXFILTER: Final = 0x400454D1
TUNGETIFF: Final = 0x800454D2
TUNGETSNDBUF: Final = 0x800454D3
TUNSETSNDBUF: Final = 0x400454D4
TUNATTACHFILTER: Final = 0x401054D5
TUNDETACHFILTER: Final = 0x401054D6
TUNGETVNETHDRSZ: Final = 0x800454D7
TUNSETVNETHDRSZ: Final = 0x400454D8
TUNSETQUEUE: Final = 0x400454D9
TUNSETIFINDEX: Final = 0x400454DA
TUNGETFILTER: Final = 0x801054DB
TUNSETVNETLE: Final = 0x400454DC
TUNGETVNETLE: Final = 0x800454DD
TUNSETVNETBE: Final = 0x400454DE
TUNGETVNETBE: Final = 0x800454DF
TUNSETSTEERINGEBPF: Final = 0x800454E0
TUNSETFILTEREBPF: Final = 0x800454E1
TUNSETCARRIER: Final = 0x400454E2
TUNGETDEVNETNS: Final = 0x000054E3

# Socket ioctls used on an AF_INET/AF_INET6 datagram socket (for link fields netlink lacks).
SIOCGIFHWADDR: Final = 0x8927
SIOCSIFHWADDR: Final = 0x8924

# --- TUNSETIFF flags (ifr_flags, a short) ------------------------------------------------------
IFF_TUN: Final = 0x0001
IFF_TAP: Final = 0x0002
IFF_NAPI: Final = 0x0010
IFF_NAPI_FRAGS: Final = 0x0020
IFF_NO_CARRIER: Final = 0x0040
IFF_MULTI_QUEUE: Final = 0x0100
IFF_ATTACH_QUEUE: Final = 0x0200
IFF_DETACH_QUEUE: Final = 0x0400
IFF_PERSIST: Final = 0x0800  # read-only in TUNGETIFF; set with TUNSETPERSIST
IFF_NO_PI: Final = 0x1000
IFF_NOFILTER: Final = 0x1000  # same bit as IFF_NO_PI: TUNGETIFF cannot tell them apart
IFF_ONE_QUEUE: Final = 0x2000
IFF_VNET_HDR: Final = 0x4000
IFF_TUN_EXCL: Final = 0x8000

IFF_TYPE_MASK: Final = IFF_TUN | IFF_TAP
# Flags a caller may pass at creation/attach time.
IFF_SETTABLE: Final = (
    IFF_TUN
    | IFF_TAP
    | IFF_NAPI
    | IFF_NAPI_FRAGS
    | IFF_NO_CARRIER
    | IFF_MULTI_QUEUE
    | IFF_NO_PI
    | IFF_ONE_QUEUE
    | IFF_VNET_HDR
    | IFF_TUN_EXCL
)

# --- TUNSETOFFLOAD bits --------------------------------------------------------------------------
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
TUN_F_TSO_ECN: Final = 0x08
TUN_F_UFO: Final = 0x10
TUN_F_USO4: Final = 0x20
TUN_F_USO6: Final = 0x40
TUN_F_UDP_TUNNEL_GSO: Final = 0x80
TUN_F_UDP_TUNNEL_GSO_CSUM: Final = 0x100

# --- tun_pi (IFF_NO_PI off): u16 flags, be16 proto ---------------------------------------------
TUN_PI_FORMAT: Final = "=H2s"  # proto stays network order bytes
TUN_PI_SIZE: Final = 4
TUN_PKT_STRIP: Final = 0x0001

# --- struct ifreq as TUNSETIFF/TUNSETQUEUE/TUNGETIFF use it: name[16], short flags, pad ---------
IFREQ_FORMAT: Final = "16sH22x"
IFREQ_SIZE: Final = struct.calcsize(IFREQ_FORMAT)  # 40


def pack_ifreq(name: bytes, flags: int) -> bytes:
    """An ifreq with a name and ifr_flags, as TUNSETIFF and TUNSETQUEUE take it."""
    return struct.pack(IFREQ_FORMAT, name, flags)


def unpack_ifreq(buf: bytes) -> tuple[str, int]:
    """Name and flags from an ifreq the kernel filled in."""
    raw, flags = struct.unpack(IFREQ_FORMAT, buf[:IFREQ_SIZE])
    return raw.split(b"\0", 1)[0].decode(), flags


def pack_ifreq_hwaddr(name: bytes, family: int, mac: bytes) -> bytes:
    """An ifreq carrying a struct sockaddr (family + 14 bytes) for SIOC[GS]IFHWADDR."""
    return struct.pack("16sH14s8x", name, family, mac.ljust(14, b"\0"))


ARPHRD_ETHER: Final = 1
ARPHRD_NONE: Final = 0xFFFE

# --- struct tun_filter (TUNSETTXFILTER): u16 flags, u16 count, u8 addr[count][6] ---------------
TUN_FLT_ALLMULTI: Final = 0x0001
TUN_FILTER_HEADER_FORMAT: Final = "=HH"
ETH_ALEN: Final = 6

# --- struct sock_fprog / sock_filter (classic BPF, TUNATTACHFILTER) ---------------------------
SOCK_FPROG_FORMAT: Final = "HxxxxxxP"  # u16 len, pad, pointer: 16 bytes on x86_64
SOCK_FILTER_FORMAT: Final = "=HBBI"  # code, jt, jf, k: 8 bytes

# --- virtio-net header (include/uapi/linux/virtio_net.h) --------------------------------------
VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_F_DATA_VALID: Final = 2
VIRTIO_NET_HDR_F_RSC_INFO: Final = 4
VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM: Final = 8

VIRTIO_NET_HDR_GSO_NONE: Final = 0
VIRTIO_NET_HDR_GSO_TCPV4: Final = 1
VIRTIO_NET_HDR_GSO_UDP: Final = 3
VIRTIO_NET_HDR_GSO_TCPV6: Final = 4
VIRTIO_NET_HDR_GSO_UDP_L4: Final = 5
VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4: Final = 0x20
VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6: Final = 0x40
VIRTIO_NET_HDR_GSO_ECN: Final = 0x80

# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset [, num_buffers]
VIRTIO_NET_HDR_BODY: Final = "BBHHHH"
VIRTIO_NET_HDR_SIZE: Final = 10
VIRTIO_NET_HDR_MRG_RXBUF_SIZE: Final = 12
# virtio_net_hdr_v1_hash_tunnel: v1 (12) + hash_value u32, hash_report u16, padding u16
# + outer_th_offset u16, inner_nh_offset u16 = 24 bytes
VIRTIO_NET_HDR_V1_HASH_TUNNEL_SIZE: Final = 24
VNET_HDR_MIN_SIZE: Final = 10

# --- syscall numbers: per architecture (arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h, which arm64 uses) ------------------------------------------
SYSCALLS: Final[dict[str, dict[str, int]]] = {
    "x86_64": {"bpf": 321, "setns": 308, "pidfd_open": 434, "pidfd_getfd": 438},
    "aarch64": {"bpf": 280, "setns": 268, "pidfd_open": 434, "pidfd_getfd": 438},
}
MACHINE: Final = platform.machine()


def syscall_number(name: str, machine: str = MACHINE) -> int:
    """The number of syscall `name` on `machine` (this one by default).

    Refused, with the reason, on an architecture mqtun has no table for: calling syscall(2)
    with another architecture's number would run some other syscall, or give an ENOSYS that
    reads as "this kernel lacks it".
    """
    try:
        return SYSCALLS[machine][name]
    except KeyError:
        from mqtun.errors import MqtunError

        known = ", ".join(sorted(SYSCALLS))
        raise MqtunError(
            errno.ENOSYS,
            f"mqtun does not know the number of the {name} syscall on {machine or 'this'} "
            f"machines (it knows {known}): add it to mqtun._uapi.SYSCALLS", op=name,
        ) from None


# legacy names: the numbers on this machine (-1 where mqtun has no table; see syscall_number)
NR_bpf: Final = SYSCALLS.get(MACHINE, {}).get("bpf", -1)
NR_pidfd_getfd: Final = SYSCALLS.get(MACHINE, {}).get("pidfd_getfd", -1)

# --- bpf(2) --------------------------------------------------------------------------------------
BPF_MAP_CREATE: Final = 0
BPF_MAP_LOOKUP_ELEM: Final = 1
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_MAP_DELETE_ELEM: Final = 3
BPF_MAP_GET_NEXT_KEY: Final = 4
BPF_PROG_LOAD: Final = 5
BPF_OBJ_GET_INFO_BY_FD: Final = 15
BPF_PROG_TEST_RUN: Final = 10

BPF_PROG_TYPE_SOCKET_FILTER: Final = 1
BPF_MAP_TYPE_HASH: Final = 1
BPF_MAP_TYPE_ARRAY: Final = 2

BPF_ANY: Final = 0

BPF_ATTR_SIZE: Final = 128  # zero-filled tail; the kernel accepts a larger attr if the tail is 0
# BPF_PROG_LOAD offsets within union bpf_attr
BPF_PROG_LOAD_FORMAT: Final = "=IIQQIIQII16s"  # type, cnt, insns, license, log_level,
# log_size, log_buf, kern_version, prog_flags, prog_name
BPF_MAP_CREATE_FORMAT: Final = "=IIIII"  # map_type, key_size, value_size, max_entries, flags
BPF_MAP_ELEM_FORMAT: Final = "=IxxxxQQQ"  # map_fd, pad, key, value, flags
BPF_OBJ_NAME_LEN: Final = 16

# eBPF instruction: u8 code, u8 dst:4 src:4, s16 off, s32 imm
BPF_INSN_FORMAT: Final = "<BBhi"
BPF_INSN_SIZE: Final = 8

# instruction classes
BPF_LD: Final = 0x00
BPF_LDX: Final = 0x01
BPF_ST: Final = 0x02
BPF_STX: Final = 0x03
BPF_ALU: Final = 0x04
BPF_JMP: Final = 0x05
BPF_RET: Final = 0x06  # classic only
BPF_JMP32: Final = 0x06
BPF_ALU64: Final = 0x07
BPF_MISC: Final = 0x07  # classic only
# sizes
BPF_W: Final = 0x00
BPF_H: Final = 0x08
BPF_B: Final = 0x10
BPF_DW: Final = 0x18
# modes
BPF_IMM: Final = 0x00
BPF_ABS: Final = 0x20
BPF_IND: Final = 0x40
BPF_MEM: Final = 0x60
BPF_LEN: Final = 0x80  # classic only
BPF_MSH: Final = 0xA0  # classic only
BPF_ATOMIC: Final = 0xC0
# alu/jmp ops
BPF_ADD: Final = 0x00
BPF_SUB: Final = 0x10
BPF_MUL: Final = 0x20
BPF_DIV: Final = 0x30
BPF_OR: Final = 0x40
BPF_AND: Final = 0x50
BPF_LSH: Final = 0x60
BPF_RSH: Final = 0x70
BPF_NEG: Final = 0x80
BPF_MOD: Final = 0x90
BPF_XOR: Final = 0xA0
BPF_MOV: Final = 0xB0
BPF_ARSH: Final = 0xC0
BPF_END: Final = 0xD0
BPF_JA: Final = 0x00
BPF_JEQ: Final = 0x10
BPF_JGT: Final = 0x20
BPF_JGE: Final = 0x30
BPF_JSET: Final = 0x40
BPF_JNE: Final = 0x50
BPF_JSGT: Final = 0x60
BPF_JSGE: Final = 0x70
BPF_CALL: Final = 0x80
BPF_EXIT: Final = 0x90
BPF_JLT: Final = 0xA0
BPF_JLE: Final = 0xB0
BPF_JSLT: Final = 0xC0
BPF_JSLE: Final = 0xD0
# sources
BPF_K: Final = 0x00
BPF_X: Final = 0x08
BPF_TO_LE: Final = 0x00
BPF_TO_BE: Final = 0x08
BPF_PSEUDO_MAP_FD: Final = 1
# classic BPF return/misc
BPF_A: Final = 0x10
BPF_TAX: Final = 0x00
BPF_TXA: Final = 0x80

# helper function ids
BPF_FUNC_map_lookup_elem: Final = 1
BPF_FUNC_get_smp_processor_id: Final = 8
BPF_FUNC_skb_load_bytes: Final = 26
BPF_FUNC_get_hash_recalc: Final = 34

# struct __sk_buff field offsets a steering program may read
SKB_LEN: Final = 0
SKB_PROTOCOL: Final = 16
SKB_QUEUE_MAPPING: Final = 12
SKB_VLAN_PRESENT: Final = 24
SKB_VLAN_TCI: Final = 28
SKB_HASH: Final = 32

# classic BPF special loads
SKF_AD_OFF: Final = -0x1000
SKF_NET_OFF: Final = -0x100000
SKF_LL_OFF: Final = -0x200000

# --- errno values (kept for old imports: the stdlib's errno.EBADFD is the one to use) ---------
EBADFD: Final = errno.EBADFD

# === steer: eBPF/cBPF steering and filters (mqtun.steer) ======================================
# bpf(2) commands and attribute layouts beyond the ones above (include/uapi/linux/bpf.h).
BPF_PROG_GET_NEXT_ID: Final = 11
BPF_PROG_GET_FD_BY_ID: Final = 13
BPF_MAP_UPDATE_BATCH: Final = 26
BPF_MAP_TYPE_PERCPU_ARRAY: Final = 6
BPF_F_TEST_RUN_ON_CPU: Final = 1 << 0
# BPF_PROG_LOAD reads up to log_true_size (@140), which the kernel fills in (6.4+).
BPF_PROG_LOAD_ATTR_SIZE: Final = 144
BPF_PROG_LOAD_LOG_TRUE_SIZE_OFFSET: Final = 140
BPF_LOG_LEVEL1: Final = 1
BPF_LOG_LEVEL2: Final = 2
# map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node, map_name
BPF_MAP_CREATE_FULL_FORMAT: Final = "=IIIIIII16s"
# prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration,
# ctx_size_in, ctx_size_out, ctx_in, ctx_out, flags, cpu, batch_size
BPF_PROG_TEST_RUN_FORMAT: Final = "=IIIIQQIIIIQQIII4x"
BPF_PROG_TEST_RUN_RETVAL_OFFSET: Final = 4
BPF_PROG_TEST_RUN_DATA_SIZE_OUT_OFFSET: Final = 12
BPF_PROG_TEST_RUN_DURATION_OFFSET: Final = 36
# BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info pointer
BPF_OBJ_GET_INFO_FORMAT: Final = "=IIQ"
BPF_OBJ_GET_INFO_LEN_OFFSET: Final = 4
# struct bpf_prog_info, the leading fields: type, id, tag[8], jited_prog_len, xlated_prog_len,
# jited_prog_insns, xlated_prog_insns, load_time, created_by_uid, nr_map_ids, map_ids, name[16]
BPF_PROG_INFO_FORMAT: Final = "=II8sIIQQQIIQ16s"
BPF_PROG_INFO_SIZE: Final = 228  # enough for every field up to 6.18 (the kernel copies min())
BPF_PROG_INFO_NR_MAP_IDS_OFFSET: Final = 52  # u32 nr_map_ids
BPF_PROG_INFO_MAP_IDS_OFFSET: Final = 56  # u64 map_ids (a pointer the kernel fills)
BPF_OBJ_GET_INFO_ATTR_SIZE: Final = 16
# struct bpf_map_info, the leading fields: type, id, key_size, value_size, max_entries,
# map_flags, name[16]
BPF_MAP_INFO_FORMAT: Final = "=IIIIII16s"
BPF_MAP_INFO_SIZE: Final = 96
# BPF_MAP_*_BATCH: in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
BPF_MAP_BATCH_FORMAT: Final = "=QQQQIIQQ"

# helper ids (enum bpf_func_id)
BPF_FUNC_map_update_elem: Final = 2
BPF_FUNC_ktime_get_ns: Final = 5
BPF_FUNC_get_prandom_u32: Final = 7
BPF_FUNC_skb_load_bytes_relative: Final = 68
BPF_HDR_START_MAC: Final = 0
BPF_HDR_START_NET: Final = 1

# more struct __sk_buff offsets
SKB_PKT_TYPE: Final = 4
SKB_MARK: Final = 8
SKB_IFINDEX: Final = 40

# eBPF-only opcode bits not spelled above
BPF_JMP_JCOND_MASK: Final = 0xF0  # the op nibble of a jump
BPF_ALU_OP_MASK: Final = 0xF0
BPF_CLASS_MASK: Final = 0x07
BPF_SIZE_MASK: Final = 0x18
BPF_MODE_MASK: Final = 0xE0
BPF_SRC_MASK: Final = 0x08
BPF_PSEUDO_MAP_VALUE: Final = 2
BPF_MAX_INSNS_PRIVILEGED: Final = 1_000_000
BPF_MAXINSNS: Final = 4096  # classic BPF program limit

# classic BPF ancillary loads (SKF_AD_OFF + ...), include/uapi/linux/filter.h
SKF_AD_PROTOCOL: Final = 0
SKF_AD_PKTTYPE: Final = 4
SKF_AD_IFINDEX: Final = 8
SKF_AD_MARK: Final = 20
SKF_AD_QUEUE: Final = 24
SKF_AD_HATYPE: Final = 28
SKF_AD_RXHASH: Final = 32
SKF_AD_CPU: Final = 36
SKF_AD_VLAN_TAG: Final = 44
SKF_AD_VLAN_TAG_PRESENT: Final = 48
SKF_AD_PAY_OFFSET: Final = 52
SKF_AD_RANDOM: Final = 56
SKF_AD_VLAN_TPID: Final = 60
BPF_MEMWORDS: Final = 16  # classic scratch memory M[0..15]

# ethertypes and IP protocol numbers a steering program parses (if_ether.h, in.h, in6.h)
ETH_HLEN: Final = 14
VLAN_HLEN: Final = 4
ETH_P_IP: Final = 0x0800
ETH_P_ARP: Final = 0x0806
ETH_P_8021Q: Final = 0x8100
ETH_P_8021AD: Final = 0x88A8
ETH_P_IPV6: Final = 0x86DD
ETH_P_802_EX1: Final = 0x88B5  # local experimental: a neutral ethertype for test runs
IPPROTO_HOPOPTS: Final = 0
IPPROTO_ICMP: Final = 1
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
IPPROTO_ROUTING: Final = 43
IPPROTO_FRAGMENT: Final = 44
IPPROTO_ICMPV6: Final = 58
IPPROTO_NONE: Final = 59
IPPROTO_DSTOPTS: Final = 60
IPV4_HDR_MIN: Final = 20
IPV6_HDR_LEN: Final = 40
IP_MF: Final = 0x2000
IP_OFFSET: Final = 0x1FFF
ENOTSUPP: Final = 524  # kernel-internal errno some bpf commands return
# BPF links (tcx: a tc program on a device without netlink, 6.6+)
BPF_LINK_CREATE: Final = 28
BPF_PROG_TYPE_SCHED_CLS: Final = 3
BPF_TCX_INGRESS: Final = 46
BPF_TCX_EGRESS: Final = 47
BPF_LINK_CREATE_FORMAT: Final = "=IIII"  # prog_fd, target_ifindex, attach_type, flags
BPF_FUNC_skb_vlan_push: Final = 18
BPF_FUNC_skb_vlan_pop: Final = 19
TC_ACT_OK: Final = 0
# === end steer =================================================================================

# === packet: offloads (mqtun.packet, mqtun.offload) ============================================
# virtio_net_hdr_mrg_rxbuf (12 bytes) and virtio_net_hdr_v1_hash_tunnel (24 bytes), after the
# byte-order prefix: ... num_buffers, hash_value u32, hash_report u16, padding u16,
# outer_th_offset u16, inner_nh_offset u16 (include/uapi/linux/virtio_net.h, 6.17+).
VIRTIO_NET_HDR_MRG_RXBUF_BODY: Final = "BBHHHHH"
VIRTIO_NET_HDR_V1_HASH_TUNNEL_BODY: Final = "BBHHHHHIH2xHH"
VIRTIO_NET_HDR_GSO_UDP_TUNNEL: Final = 0x60  # _IPV4 | _IPV6
VIRTIO_NET_HDR_TUNNEL_OFFSET: Final = 20  # where outer_th_offset sits in the 24-byte header
TUN_F_ALL: Final = 0x1FF  # every TUN_F_* bit known to 6.18
GSO_MAX_SEGS: Final = 65535  # include/linux/netdevice.h
GSO_LEGACY_MAX_SIZE: Final = 65536  # largest super-packet without BIG TCP
ETH_P_QINQ1: Final = 0x9100  # a pre-802.1ad double-tag ethertype some switches still send
IPPROTO_AH: Final = 51
IPV6_RH_TYPE_SRH: Final = 4  # segment routing header (include/uapi/linux/seg6.h)
# TCP header flag bits, byte 13 (include/net/tcp.h TCPHDR_*)
TCPHDR_FIN: Final = 0x01
TCPHDR_SYN: Final = 0x02
TCPHDR_RST: Final = 0x04
TCPHDR_PSH: Final = 0x08
TCPHDR_ACK: Final = 0x10
TCPHDR_URG: Final = 0x20
TCPHDR_ECE: Final = 0x40
TCPHDR_CWR: Final = 0x80
TCP_CSUM_OFFSET: Final = 16  # offsetof(struct tcphdr, check)
UDP_CSUM_OFFSET: Final = 6  # offsetof(struct udphdr, check)
UDP_HLEN: Final = 8
VXLAN_PORT: Final = 4789  # IANA; the kernel's IANA_VXLAN_UDP_PORT
VXLAN_HLEN: Final = 8
SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103  # setsockopt: UDP GSO segment size (include/uapi/linux/udp.h)
SO_SNDBUFFORCE: Final = 32  # asm-generic/socket.h: SO_SNDBUF past wmem_max (CAP_NET_ADMIN)
SO_RCVBUFFORCE: Final = 33  # asm-generic/socket.h: SO_RCVBUF past rmem_max (CAP_NET_ADMIN)
# === end packet ================================================================================

# === tunnel: UDP endpoints and VXLAN (mqtun.runtime.sockets, mqtun.packet.vxlan) ==============
UDP_GRO: Final = 104  # setsockopt/cmsg: receive coalesced datagrams (include/uapi/linux/udp.h)
UDP_MAX_SEGMENTS: Final = 64  # datagrams per UDP_SEGMENT send (1 << 6 before 6.x, 1 << 7 after)
IP_MTU: Final = 14  # getsockopt on a connected socket: the path MTU (include/uapi/linux/in.h)
IPV6_MTU: Final = 24  # include/uapi/linux/in6.h
SO_ATTACH_REUSEPORT_EBPF: Final = 52  # asm-generic/socket.h
SO_DETACH_REUSEPORT_BPF: Final = 68
SO_RXQ_OVFL: Final = 40  # asm-generic/socket.h: a cmsg (u32) with the socket's drops so far
VXLAN_HF_VNI: Final = 0x08000000  # the I flag, first 32-bit word (include/net/vxlan.h)
VXLAN_VNI_MAX: Final = 0xFFFFFF
VXLAN_OVERHEAD_IPV4: Final = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
VXLAN_OVERHEAD_IPV6: Final = 70  # outer IPv6 40 + UDP 8 + VXLAN 8 + inner Ethernet 14
IP_LOCAL_PORT_RANGE_DEFAULT: Final = (32768, 60999)  # net.ipv4.ip_local_port_range default
ICMP_DEST_UNREACH: Final = 3  # include/uapi/linux/icmp.h
ICMP_FRAG_NEEDED: Final = 4
ICMPV6_PKT_TOOBIG: Final = 2  # include/uapi/linux/icmpv6.h
IP_DF: Final = 0x4000
IPV6_MIN_MTU: Final = 1280
IPV4_MIN_MTU: Final = 576  # the largest ICMP error an IPv4 host sends (RFC 1812)
# === end tunnel ================================================================================

# === seams-core: links, namespaces, processes ===================================================
# net_device flags (include/uapi/linux/if.h)
IFF_UP: Final = 0x1
IFF_BROADCAST: Final = 0x2
IFF_POINTOPOINT: Final = 0x10
IFF_LOWER_UP: Final = 0x10000
IFA_F_NODAD: Final = 0x80  # include/uapi/linux/if_addr.h
RT_SCOPE_HOST: Final = 254  # include/uapi/linux/rtnetlink.h
CLONE_NEWNET: Final = 0x40000000  # include/uapi/linux/sched.h
PR_SET_PDEATHSIG: Final = 1  # include/uapi/linux/prctl.h
PR_SET_NAME: Final = 15
# glibc mallopt(3) (malloc.h): not the kernel's, but an ABI number all the same
M_TRIM_THRESHOLD: Final = -1
# The ethtool feature (netdev_features_strings) each TUNSETOFFLOAD bit turns on
# (drivers/net/tun.c set_offload); the kernel has no getter for the mask itself.
TUN_F_FEATURES: Final = (
    ("tx-checksum-ip-generic", TUN_F_CSUM),
    ("tx-tcp-segmentation", TUN_F_TSO4),
    ("tx-tcp6-segmentation", TUN_F_TSO6),
    ("tx-tcp-ecn-segmentation", TUN_F_TSO_ECN),
    ("tx-udp-segmentation", TUN_F_USO4 | TUN_F_USO6),
    ("tx-udp_tnl-segmentation", TUN_F_UDP_TUNNEL_GSO),
    ("tx-udp_tnl-csum-segmentation", TUN_F_UDP_TUNNEL_GSO_CSUM),
)
# === end seams-core ==============================================================================

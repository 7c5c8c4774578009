/* Types shared by the XDP program and the Python loader (xdpturn/fastpath/maps.py).
 *
 * The only definition of map keys/values and of the route and pass-reason enums. Every address and
 * port is in network byte order so packet bytes become keys as they are; IPv4 addresses in 16-byte
 * fields are IPv4-mapped (::ffff:a.b.c.d). maps.py mirrors these structs with ctypes and a test
 * compares both against this object's BTF, so keep all fields fixed-width with explicit padding.
 */
#ifndef XDPTURN_SHARED_H
#define XDPTURN_SHARED_H

#include <linux/types.h>

#define XDPTURN_FAMILY_IPV4 4
#define XDPTURN_FAMILY_IPV6 6

/* What the program did with a packet it relayed: from_<family>_<kind>_to_<family>_<kind>.
 * The loader names counters by lower-casing the part after XDPTURN_ROUTE_. */
enum xdpturn_route {
	XDPTURN_ROUTE_IPV4_CHANNEL_TO_IPV4_UDP = 0,
	XDPTURN_ROUTE_IPV4_CHANNEL_TO_IPV6_UDP,
	XDPTURN_ROUTE_IPV4_CHANNEL_TO_IPV4_CHANNEL,
	XDPTURN_ROUTE_IPV4_CHANNEL_TO_IPV6_CHANNEL,
	XDPTURN_ROUTE_IPV6_CHANNEL_TO_IPV4_UDP,
	XDPTURN_ROUTE_IPV6_CHANNEL_TO_IPV6_UDP,
	XDPTURN_ROUTE_IPV6_CHANNEL_TO_IPV4_CHANNEL,
	XDPTURN_ROUTE_IPV6_CHANNEL_TO_IPV6_CHANNEL,
	XDPTURN_ROUTE_IPV4_UDP_TO_IPV4_CHANNEL,
	XDPTURN_ROUTE_IPV4_UDP_TO_IPV6_CHANNEL,
	XDPTURN_ROUTE_IPV6_UDP_TO_IPV4_CHANNEL,
	XDPTURN_ROUTE_IPV6_UDP_TO_IPV6_CHANNEL,
	XDPTURN_ROUTE_COUNT,
};

/* Why a packet went to the kernel stack (XDP_PASS) and so to Python, which holds the truth. */
enum xdpturn_reason {
	XDPTURN_PASS_NOT_IP = 0,          /* not IPv4/IPv6 (ARP, VLAN-tagged, ...) */
	XDPTURN_PASS_NOT_UDP,             /* IP, but not UDP */
	XDPTURN_PASS_IPV4_OPTIONS,        /* IHL > 5 */
	XDPTURN_PASS_IPV6_EXTENSION,      /* an extension header before UDP */
	XDPTURN_PASS_FRAGMENT,            /* IPv4 MF/offset or IPv6 fragment header */
	XDPTURN_PASS_TRUNCATED,           /* a header or the IP length runs past the frame */
	XDPTURN_PASS_BAD_LENGTH,          /* IP and UDP lengths disagree, or too short for UDP */
	XDPTURN_PASS_BAD_IPV4_CHECKSUM,   /* IPv4 header checksum wrong: never re-sign a corrupt header */
	XDPTURN_PASS_NOT_TURN,            /* not to our address, or to a port without routes */
	XDPTURN_PASS_STUN,                /* STUN (first two bits 00) on the TURN port */
	XDPTURN_PASS_BAD_CHANNEL_NUMBER,  /* not STUN, channel outside 0x4000-0x7fff */
	XDPTURN_PASS_BAD_CHANNEL_LENGTH,  /* ChannelData length beyond the datagram, or >3 bytes pad */
	XDPTURN_PASS_NO_CHANNEL,          /* no route for (client, channel) */
	XDPTURN_PASS_NO_PEER,             /* allocation port known, no route for the peer */
	XDPTURN_PASS_HAIRPIN_NO_ROUTE,    /* peer is the relay itself, other allocation has no route */
	XDPTURN_PASS_ZERO_CHECKSUM,       /* UDP checksum 0 where the output needs one (IPv6) */
	XDPTURN_PASS_TTL_EXPIRED,         /* TTL/hop limit <= 1 */
	XDPTURN_PASS_TOO_BIG,             /* the output exceeds the egress MTU */
	XDPTURN_PASS_NO_NEIGHBOUR,        /* bpf_fib_lookup: next hop has no resolved neighbour */
	XDPTURN_PASS_NO_NEXT_HOP,         /* not in next_hops (yet) and the FIB cannot be asked */
	XDPTURN_PASS_FIB_FAILED,          /* no route, blackhole, unreachable, ... */
	XDPTURN_PASS_ADJUST_FAILED,       /* bpf_xdp_adjust_head refused (no headroom); untouched */
	XDPTURN_PASS_NO_CONFIG,           /* the config entry was never written */
	XDPTURN_PASS_COUNT,
};

/* Why the program dropped a packet (XDP_DROP), counted apart from the pass reasons because it is
 * not a pass. REWRITTEN_TRUNCATED: a buffer already rewritten then fails the bounds re-check after
 * bpf_xdp_adjust_head, which cannot happen in practice: it can no longer go to the stack. The
 * others are the guard's (bpf/guard.h): it can never be valid, or it is over a rate limit. */
enum xdpturn_drop {
	XDPTURN_DROP_REWRITTEN_TRUNCATED = 0,
	XDPTURN_DROP_NOT_TURN_MESSAGE,     /* TURN port: under 4 bytes, or first two bits 10/11 */
	XDPTURN_DROP_BAD_STUN,             /* first bits 00, but no cookie or a length that lies */
	XDPTURN_DROP_BAD_CHANNEL_DATA,     /* ChannelData whose length runs past the datagram */
	XDPTURN_DROP_UNKNOWN_CLIENT,       /* ChannelData from an address without an allocation */
	XDPTURN_DROP_NO_PERMISSION,        /* to an allocation port from a peer without permission */
	XDPTURN_DROP_STUN_RATE_SOURCE,     /* STUN from a source over its rate */
	XDPTURN_DROP_STUN_RATE_TOTAL,      /* STUN from all sources without allocation over theirs */
	XDPTURN_DROP_ALLOCATION_RATE,      /* over --max-bps-per-allocation (meter.h) */
	XDPTURN_DROP_COUNT,
};

/* chan_to_udp: ChannelData from a client on a channel -> the peer and allocation port. */
struct xdpturn_chan_key {
	__u8 client_addr[16];
	__be16 client_port;
	__be16 channel;
	__u8 family; /* of client_addr */
	__u8 pad[3];
};

struct xdpturn_chan_value {
	__u8 peer_addr[16];
	__be16 peer_port;
	__be16 relay_port; /* the allocation's port: source port of what goes to the peer */
	__u8 peer_family;
	__u8 pad[3];
};

/* udp_to_chan: UDP from a peer to an allocation port -> the client and channel. */
struct xdpturn_udp_key {
	__u8 peer_addr[16];
	__be16 peer_port;
	__be16 relay_port;
	__u8 family; /* of peer_addr */
	__u8 pad[3];
};

struct xdpturn_udp_value {
	__u8 client_addr[16];
	__be16 client_port;
	__be16 channel;
	__u8 client_family;
	__u8 pad[3];
};

/* config[0]. local_*: the source address of everything sent in that family when the relay is
 * told one (it binds there); all-zero: the next hop's source (next_hops, or the FIB's choice).
 * turn_port 0: not configured, everything passes. */
struct xdpturn_config {
	__u8 local_ipv4[4];
	__u8 local_ipv6[16];
	__be16 turn_port;
	__u8 pad[2];
};

/* An address of some family: the key of relay_addrs and next_hops. */
struct xdpturn_addr_key {
	__u8 addr[16];
	__u8 family;
	__u8 pad[3];
};

/* next_hops value: how to reach a client or peer address without the FIB, resolved by the
 * loader from the kernel's routes and neighbours (kept current from netlink events). */
struct xdpturn_next_hop {
	__u8 src[16];   /* the source address the kernel would choose for this destination */
	__u32 ifindex;  /* egress device */
	__u8 smac[6];   /* the egress device's MAC */
	__u8 dmac[6];   /* the neighbour's: the gateway's, or the destination's on a link */
	__u16 mtu;      /* host order: the largest IP packet the route allows */
	__u8 pad[2];
};

struct xdpturn_route_stats {
	__u64 packets;
	__u64 bytes; /* frame bytes as sent */
};

/* --- The guard: what the program drops instead of passing (bpf/guard.h, docs/security.md) --- */

/* guard_config.flags */
#define XDPTURN_GUARD_ENABLED 1U       /* drop what can never be valid; else pass, as before */
#define XDPTURN_GUARD_CLIENTS_COMPLETE 2U /* every UDP allocation is in guard_clients */

/* guard_config[0], written by the loader. A rate limit is a GCRA schedule: each packet moves a
 * bucket's time `interval_ns` ahead, and a packet that would put it more than `burst_ns` ahead of
 * now is dropped. interval_ns 0: no limit. */
struct xdpturn_guard_config {
	__u64 source_interval_ns;
	__u64 source_burst_ns;
	__u64 total_interval_ns;
	__u64 total_burst_ns;
	__u32 flags;
	__u8 pad[4];
};

/* guard_clients: (address, port) of a UDP client with an allocation, value unused (1). */
struct xdpturn_client_key {
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 pad;
};

/* guard_permissions: (allocation port, peer address) that a permission admits. */
struct xdpturn_permission_key {
	__u8 peer_addr[16];
	__be16 relay_port;
	__u8 family;
	__u8 pad;
};

/* guard_sources: a source's rate-limit schedule, keyed by its address (an IPv6 one cut to /64). */
struct xdpturn_source_key {
	__u8 addr[16];
};

/* --- Metering and limits per allocation (bpf/meter.h, docs/operations.md) --- */

/* Which way a relayed datagram goes for the allocation it is counted on. Channel to channel
 * (the relay is the peer) counts on both allocations: the sender's client_to_peer and the
 * receiver's peer_to_client. */
enum xdpturn_direction {
	XDPTURN_DIR_CLIENT_TO_PEER = 0,
	XDPTURN_DIR_PEER_TO_CLIENT,
	XDPTURN_DIR_COUNT,
};

/* Payload bytes (what the peer sends or receives: no IP, UDP or ChannelData header) of one
 * direction; `dropped_*` is what the per-allocation rate limit refused. */
struct xdpturn_meter_counts {
	__u64 packets;
	__u64 bytes;
	__u64 dropped_packets;
	__u64 dropped_bytes;
};

/* alloc_meters value (per CPU), keyed by the allocation's port (__u32, host order). */
struct xdpturn_meter {
	struct xdpturn_meter_counts dir[XDPTURN_DIR_COUNT];
};

/* alloc_limits value (one for all CPUs), keyed like alloc_meters: per direction, the time (ns,
 * bpf_ktime_get_ns) up to which the allocation's rate schedule is booked (GCRA). */
struct xdpturn_limit {
	__u64 booked_ns[XDPTURN_DIR_COUNT];
};

/* meter_config[0], written by the loader. rate_bps 0: no limit; else each direction of each
 * allocation gets `rate_bps` bits of payload per second, with bursts up to `burst_ns` of it. */
#define XDPTURN_METER_ENABLED 1U /* count per allocation; clear: the hook does nothing */
struct xdpturn_meter_config {
	__u64 rate_bps;
	__u64 burst_ns;
	__u32 flags;
	__u8 pad[4];
};

#endif /* XDPTURN_SHARED_H */

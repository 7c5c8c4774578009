/* Maps, and the exits through which every verdict is counted (BPF only). */
#ifndef XDPTURN_MAPS_H
#define XDPTURN_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "shared.h"

#ifndef XDPTURN_MAX_ROUTES /* a build option: a relay with another value cannot adopt these maps */
#define XDPTURN_MAX_ROUTES 65536
#endif

/* Client (address, port, channel) -> peer and allocation port. Written by the server per channel
 * binding (both directions at once), read for every ChannelData packet on the TURN port. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDPTURN_MAX_ROUTES);
	__type(key, struct xdpturn_chan_key);
	__type(value, struct xdpturn_chan_value);
} chan_to_udp SEC(".maps");

/* Peer (address, port) and allocation port -> client and channel. Also the hairpin lookup: a peer
 * that is the relay itself is found as (relay address, sending allocation's port). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDPTURN_MAX_ROUTES);
	__type(key, struct xdpturn_udp_key);
	__type(value, struct xdpturn_udp_value);
} udp_to_chan SEC(".maps");

/* Allocation port -> number of routes using it. A UDP packet to a port at 0 is not ours to look at
 * (not_turn), which keeps unrelated traffic from being counted as an unknown peer. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} relay_ports SEC(".maps");

/* The relay's own addresses: every address of the attached interfaces and the public ones clients
 * are told. A packet to one is for the relay; a peer that is one is the relay itself (hairpin).
 * The loader keeps it current from netlink address events. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct xdpturn_addr_key);
	__type(value, __u8);
} relay_addrs SEC(".maps");

/* Client or peer address -> next hop (egress device, MACs, MTU, source). Written by the loader for
 * every destination of an installed route whose neighbour is resolved, rewritten on route,
 * neighbour, address and link changes. A miss falls back to bpf_fib_lookup, which works only on
 * an ingress device with forwarding on; otherwise Python relays until the entry appears. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * XDPTURN_MAX_ROUTES);
	__type(key, struct xdpturn_addr_key);
	__type(value, struct xdpturn_next_hop);
} next_hops SEC(".maps");

/* One entry: struct xdpturn_config. Written once by the loader before attaching. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xdpturn_config);
} config SEC(".maps");

/* Per route (enum xdpturn_route): packets and bytes relayed. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDPTURN_ROUTE_COUNT);
	__type(key, __u32);
	__type(value, struct xdpturn_route_stats);
} route_stats SEC(".maps");

/* Per pass reason (enum xdpturn_reason): packets handed to the stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDPTURN_PASS_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} pass_stats SEC(".maps");

/* Per drop reason (enum xdpturn_drop): packets dropped. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDPTURN_DROP_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} drop_stats SEC(".maps");

/* Referenced so that the enums are in the object's BTF: the loader reads counter names there. */
const volatile enum xdpturn_route xdpturn_route_names __attribute__((used));
const volatile enum xdpturn_reason xdpturn_reason_names __attribute__((used));
const volatile enum xdpturn_drop xdpturn_drop_names __attribute__((used));

static __always_inline void count(void *map, __u32 key)
{
	__u64 *n = bpf_map_lookup_elem(map, &key);

	if (n)
		*n += 1;
}

/* The exits. Every return of the program goes through one of these three. */
static __always_inline int exit_pass(enum xdpturn_reason reason)
{
	count(&pass_stats, reason);
	return XDP_PASS;
}

static __always_inline int exit_drop(enum xdpturn_drop reason)
{
	count(&drop_stats, reason);
	return XDP_DROP;
}

static __always_inline int exit_forward(enum xdpturn_route route, __u32 bytes, int action)
{
	__u32 key = route;
	struct xdpturn_route_stats *s = bpf_map_lookup_elem(&route_stats, &key);

	if (s) {
		s->packets += 1;
		s->bytes += bytes;
	}
	return action;
}

#endif /* XDPTURN_MAPS_H */

/* The guard: what the program drops rather than hands to the stack, and the STUN rate limits
 * (BPF only; docs/security.md has the rules in prose).
 *
 * On the TURN port a datagram is STUN (first two bits 00, magic cookie, a length that is a
 * multiple of 4 and equal to the datagram's after the header) or ChannelData (first two bits 01,
 * a length within the datagram); anything else is dropped. ChannelData that the program cannot
 * relay goes to Python only when its source (address, port) holds an allocation, which the
 * server writes to guard_clients for every UDP allocation: a channel bound in Python but not in
 * the kernel (a failed map update) still reaches Python; an unknown source's ChannelData can
 * never be valid. If a guard_clients update ever fails, the loader clears
 * XDPTURN_GUARD_CLIENTS_COMPLETE and such ChannelData is passed again. Valid STUN from a source
 * with an allocation passes unlimited (its refreshes, Send indications); from anyone else it goes
 * through a per-source and then a relay-wide rate limit.
 *
 * On an allocation port (guard_ports), a datagram from a peer address that no permission admits
 * (guard_permissions, kept by the server from the core's AddPermission/RemovePermission) is
 * dropped; with a permission but no channel it goes to Python as before (a Data indication).
 *
 * Without guard_config (or with XDPTURN_GUARD_ENABLED clear) every hook passes with the reason
 * the program gave before the guard existed.
 */
#ifndef XDPTURN_GUARD_H
#define XDPTURN_GUARD_H

#include <linux/bpf.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "shared.h"
#include "packet.h"
#include "maps.h"

#define XDPTURN_MAX_CLIENTS 65536
#define XDPTURN_MAX_PERMISSIONS 262144
#define XDPTURN_MAX_SOURCES 65536
#define STUN_MAGIC_COOKIE 0x2112A442

/* One entry: struct xdpturn_guard_config. Written by the loader before attaching. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xdpturn_guard_config);
} guard_config SEC(".maps");

/* UDP clients with an allocation, by (address, port). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDPTURN_MAX_CLIENTS);
	__type(key, struct xdpturn_client_key);
	__type(value, __u8);
} guard_clients SEC(".maps");

/* Allocation port -> number of allocations on it (0: not an allocation port). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} guard_ports SEC(".maps");

/* (allocation port, peer address) with a live permission. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDPTURN_MAX_PERMISSIONS);
	__type(key, struct xdpturn_permission_key);
	__type(value, __u8);
} guard_permissions SEC(".maps");

/* Per source: the time (ns) up to which its rate-limit schedule is booked. LRU: a flood of
 * spoofed sources evicts the oldest entries instead of failing. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, XDPTURN_MAX_SOURCES);
	__type(key, struct xdpturn_source_key);
	__type(value, __u64);
} guard_sources SEC(".maps");

/* The relay-wide schedule for STUN from sources without an allocation. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} guard_total SEC(".maps");

struct stun_hdr {
	__be16 type;
	__be16 len;
	__be32 cookie;
	__u8 transaction_id[12];
};

/* The guard's configuration, or NULL when it is off. */
static __always_inline const struct xdpturn_guard_config *guard_on(void)
{
	__u32 zero = 0;
	struct xdpturn_guard_config *g = bpf_map_lookup_elem(&guard_config, &zero);

	return g && (g->flags & XDPTURN_GUARD_ENABLED) ? g : NULL;
}

/* Drops for `drop` when the guard is on, else passes for `pass` (the reason before the guard). */
static __always_inline int guard_drop(enum xdpturn_drop drop, enum xdpturn_reason pass)
{
	return guard_on() ? exit_drop(drop) : exit_pass(pass);
}

static __always_inline int guard_known_client(const struct packet *p)
{
	struct xdpturn_client_key key = {};

	__builtin_memcpy(key.addr, &p->src, 16);
	key.port = p->sport;
	key.family = p->family;
	return bpf_map_lookup_elem(&guard_clients, &key) != NULL;
}

/* GCRA: book one packet on the schedule `*booked`; false when that would run it more than
 * `burst` ns ahead of `now`. Updates from two CPUs at once may lose one booking: the limit is
 * approximate by a packet or two, never by a rate. */
static __always_inline int gcra_take(__u64 *booked, __u64 now, __u64 interval, __u64 burst)
{
	__u64 next = (*booked > now ? *booked : now) + interval;

	if (next - now > burst)
		return 0;
	*booked = next;
	return 1;
}

static __always_inline int guard_source_allows(const struct packet *p,
					       const struct xdpturn_guard_config *g, __u64 now)
{
	struct xdpturn_source_key key = {};
	__u64 *booked, first;

	__builtin_memcpy(key.addr, &p->src, 16);
	if (p->family == XDPTURN_FAMILY_IPV6)
		__builtin_memset(key.addr + 8, 0, 8); /* a host's /64 is one source */
	booked = bpf_map_lookup_elem(&guard_sources, &key);
	if (booked)
		return gcra_take(booked, now, g->source_interval_ns, g->source_burst_ns);
	first = now + g->source_interval_ns;
	bpf_map_update_elem(&guard_sources, &key, &first, BPF_ANY);
	return 1;
}

/* A datagram on the TURN port whose first two bits are 00: STUN, or nothing. */
static __always_inline int guard_stun(const struct packet *p, const void *payload, const void *end)
{
	const struct xdpturn_guard_config *g = guard_on();
	const struct stun_hdr *h = payload;
	__u32 zero = 0, len;
	__u64 now, *total;

	if (!g)
		return exit_pass(XDPTURN_PASS_STUN);
	if ((const void *)(h + 1) > end)
		return exit_drop(XDPTURN_DROP_BAD_STUN);
	len = bpf_ntohs(h->len);
	if (h->cookie != bpf_htonl(STUN_MAGIC_COOKIE) || (len & 3) ||
	    len + sizeof(*h) + sizeof(struct udphdr) != p->udp_len)
		return exit_drop(XDPTURN_DROP_BAD_STUN);
	if (guard_known_client(p))
		return exit_pass(XDPTURN_PASS_STUN);
	now = bpf_ktime_get_ns();
	if (g->source_interval_ns && !guard_source_allows(p, g, now))
		return exit_drop(XDPTURN_DROP_STUN_RATE_SOURCE);
	if (g->total_interval_ns) {
		total = bpf_map_lookup_elem(&guard_total, &zero);
		if (total && !gcra_take(total, now, g->total_interval_ns, g->total_burst_ns))
			return exit_drop(XDPTURN_DROP_STUN_RATE_TOTAL);
	}
	return exit_pass(XDPTURN_PASS_STUN);
}

/* Well-formed ChannelData on the TURN port that the program does not relay (`pass` says why). */
static __always_inline int guard_channel_miss(const struct packet *p, enum xdpturn_reason pass)
{
	const struct xdpturn_guard_config *g = guard_on();

	if (!g || !(g->flags & XDPTURN_GUARD_CLIENTS_COMPLETE) || guard_known_client(p))
		return exit_pass(pass);
	return exit_drop(XDPTURN_DROP_UNKNOWN_CLIENT);
}

/* UDP to one of the relay's addresses on a port other than the TURN port, without a route for
 * its source (`pass` says why). `from_relay`: the source is one of the relay's own addresses. */
static __always_inline int guard_peer_miss(const struct packet *p, enum xdpturn_reason pass,
					   int from_relay)
{
	struct xdpturn_permission_key key = {};
	__u32 port = bpf_ntohs(p->dport);
	__u32 *allocations;

	if (from_relay || !guard_on())
		return exit_pass(pass);
	allocations = bpf_map_lookup_elem(&guard_ports, &port);
	if (!allocations || *allocations == 0)
		return exit_pass(pass); /* not an allocation port: not the relay's to judge */
	__builtin_memcpy(key.peer_addr, &p->src, 16);
	key.relay_port = p->dport;
	key.family = p->family;
	if (bpf_map_lookup_elem(&guard_permissions, &key))
		return exit_pass(pass);
	return exit_drop(XDPTURN_DROP_NO_PERMISSION);
}

#endif /* XDPTURN_GUARD_H */

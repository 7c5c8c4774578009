/* Metering and limits per allocation (BPF only; docs/operations.md says it for operators).
 *
 * Where main.c has decided a route, meter_admit() marks the packet with the allocations it leaves
 * and reaches (their ports) and its payload length, and applies the per-allocation rate limit:
 * a datagram over it is dropped here, counted in that allocation's dropped_* and as the drop
 * reason allocation_rate (never handed to Python, which would relay it). When the packet is sent,
 * egress_send() calls meter_count(), which adds it to the allocations' counters. A packet that
 * goes to the stack after its route was decided (no next hop, too big, ...) is relayed, and so
 * counted, by Python instead, never twice.
 *
 * alloc_meters holds per-CPU counters; the loader creates an allocation's entry when it opens and
 * deletes it after a last read when it closes, so a port reused by a new allocation starts at 0.
 * An allocation without an entry is relayed but not counted.
 *
 * The limit is one GCRA schedule per allocation and direction shared by every CPU (alloc_limits):
 * per-CPU schedules would give an allocation N times its rate when its packets spread over N CPUs,
 * or a fraction of it when they are split unevenly. The schedule moves with an atomic add, which
 * only contends when one allocation's packets arrive on several CPUs at once; the check before
 * the add is not atomic with it, so CPUs racing on one allocation can each admit one datagram
 * beyond the schedule. An entry is created on first use and deleted by the loader on close.
 */
#ifndef XDPTURN_METER_H
#define XDPTURN_METER_H

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "shared.h"
#include "packet.h"
#include "maps.h"

#define XDPTURN_MAX_METERS 65536
#define XDPTURN_NS_PER_S 1000000000ULL

/* Allocation port (__u32, host order) -> packets and payload bytes per direction, per CPU. Not
 * preallocated: 64 bytes per CPU per entry would be 256 MiB on 64 CPUs for all 65536 ports; only
 * the loader creates entries (the program updates them in place), so memory follows the
 * allocations open. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, XDPTURN_MAX_METERS);
	__type(key, __u32);
	__type(value, struct xdpturn_meter);
} alloc_meters SEC(".maps");

/* Allocation port -> its rate schedules, one per direction, shared by all CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDPTURN_MAX_METERS);
	__type(key, __u32);
	__type(value, struct xdpturn_limit);
} alloc_limits SEC(".maps");

/* One entry: struct xdpturn_meter_config. Written by the loader before attaching. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xdpturn_meter_config);
} meter_config SEC(".maps");

const volatile enum xdpturn_direction xdpturn_direction_names __attribute__((used));

static __always_inline void meter_add(__u32 port, enum xdpturn_direction dir, __u16 len,
				      int dropped)
{
	struct xdpturn_meter *m = bpf_map_lookup_elem(&alloc_meters, &port);
	struct xdpturn_meter_counts *c;

	if (!m)
		return;
	c = &m->dir[dir == XDPTURN_DIR_CLIENT_TO_PEER ? 0 : 1];
	if (dropped) {
		c->dropped_packets += 1;
		c->dropped_bytes += len;
	} else {
		c->packets += 1;
		c->bytes += len;
	}
}

/* Book `len` bytes on one direction's schedule: 1 if it fits the rate and burst, else 0. */
static __always_inline int meter_take(const struct xdpturn_meter_config *mc, __u32 port,
				      enum xdpturn_direction dir, __u16 len, __u64 now)
{
	struct xdpturn_limit *l = bpf_map_lookup_elem(&alloc_limits, &port);
	__u64 cost, booked, *slot;

	if (!l) {
		struct xdpturn_limit fresh = {};

		bpf_map_update_elem(&alloc_limits, &port, &fresh, BPF_NOEXIST);
		l = bpf_map_lookup_elem(&alloc_limits, &port);
		if (!l)
			return 1; /* the map is full: relaying beats dropping an allocation's media */
	}
	slot = &l->booked_ns[dir == XDPTURN_DIR_CLIENT_TO_PEER ? 0 : 1];
	cost = (__u64)len * 8 * XDPTURN_NS_PER_S / mc->rate_bps;
	booked = *slot;
	if (booked < now) { /* idle: the schedule restarts from now */
		*slot = now;
		booked = now;
	}
	if (booked + cost > now + mc->burst_ns)
		return 0;
	__sync_fetch_and_add(slot, cost);
	return 1;
}

/* Over the limit: dropped, counted relay-wide and on the allocation that refused it. */
static __always_inline int meter_drop(__u32 port, enum xdpturn_direction dir, __u16 len)
{
	meter_add(port, dir, len, 1);
	return exit_drop(XDPTURN_DROP_ALLOCATION_RATE);
}

/* The hook where a route has been decided: `from_port` is the allocation whose client sent the
 * packet (ChannelData in), `to_port` the one whose client receives it (ChannelData out), either 0
 * when there is none; both network order. Returns the verdict to exit with, or -1 to go on. */
static __always_inline int meter_admit(struct packet *p, __be16 from_port, __be16 to_port,
				       __u16 len)
{
	__u32 zero = 0, from = bpf_ntohs(from_port), to = bpf_ntohs(to_port);
	struct xdpturn_meter_config *mc = bpf_map_lookup_elem(&meter_config, &zero);
	__u64 now;

	if (!mc || !(mc->flags & XDPTURN_METER_ENABLED))
		return -1;
	p->meter.from_port = from;
	p->meter.to_port = to;
	p->meter.len = len;
	if (mc->rate_bps == 0)
		return -1;
	now = bpf_ktime_get_ns();
	if (from && !meter_take(mc, from, XDPTURN_DIR_CLIENT_TO_PEER, len, now))
		return meter_drop(from, XDPTURN_DIR_CLIENT_TO_PEER, len);
	if (to && !meter_take(mc, to, XDPTURN_DIR_PEER_TO_CLIENT, len, now))
		return meter_drop(to, XDPTURN_DIR_PEER_TO_CLIENT, len);
	return -1;
}

/* The packet marked by meter_admit was sent: count it on its allocations. */
static __always_inline void meter_count(const struct meter_mark *m)
{
	if (m->from_port)
		meter_add(m->from_port, XDPTURN_DIR_CLIENT_TO_PEER, m->len, 0);
	if (m->to_port)
		meter_add(m->to_port, XDPTURN_DIR_PEER_TO_CLIENT, m->len, 0);
}

#endif /* XDPTURN_METER_H */

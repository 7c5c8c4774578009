// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
/* xdpturn's XDP program: relays ChannelData <-> UDP for bound channels (RFC 8656).
 *
 * Parses Ethernet / IPv4 or IPv6 / UDP, then dispatches on the destination port:
 *   - the TURN port: ChannelData from a client -> from_ipv{4,6}_channel/ (to a peer as UDP, or to
 *     another allocation's client as ChannelData when the peer is the relay itself);
 *   - an allocation port with routes: UDP from a peer -> from_ipv{4,6}_udp/ (ChannelData to the client).
 * Anything the program cannot route goes to the stack (XDP_PASS) with its reason counted; Python
 * handles it. What can never be valid, STUN over its rate (guard.h) and a datagram over its
 * allocation's rate limit (meter.h) are dropped instead; besides, the program drops nothing it
 * has not rewritten (see enum xdpturn_drop).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "shared.h"
#include "packet.h"
#include "csum.h"
#include "maps.h"
#include "meter.h"
#include "emit.h"
#include "leaves.h"
#include "guard.h"

#include "from_ipv4_channel/to_ipv4_udp.h"
#include "from_ipv4_channel/to_ipv6_udp.h"
#include "from_ipv4_channel/to_ipv4_channel.h"
#include "from_ipv4_channel/to_ipv6_channel.h"
#include "from_ipv6_channel/to_ipv4_udp.h"
#include "from_ipv6_channel/to_ipv6_udp.h"
#include "from_ipv6_channel/to_ipv4_channel.h"
#include "from_ipv6_channel/to_ipv6_channel.h"
#include "from_ipv4_udp/to_ipv4_channel.h"
#include "from_ipv4_udp/to_ipv6_channel.h"
#include "from_ipv6_udp/to_ipv4_channel.h"
#include "from_ipv6_udp/to_ipv6_channel.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define PARSE_OK (-1)

/* IPv4 header without options; fills the addresses, TTL, TOS and the UDP length it implies. */
static __always_inline int parse_ipv4(struct cursor *c, struct packet *p)
{
	struct iphdr *ip = cursor_take(c, sizeof(*ip));
	__u16 tot_len;

	if (!ip)
		return XDPTURN_PASS_TRUNCATED;
	if (ip->version != 4)
		return XDPTURN_PASS_NOT_IP;
	if (ip->ihl != 5)
		return ip->ihl < 5 ? XDPTURN_PASS_BAD_LENGTH : XDPTURN_PASS_IPV4_OPTIONS;
	if (ip->protocol != IPPROTO_UDP)
		return XDPTURN_PASS_NOT_UDP;
	if (ip->frag_off & bpf_htons(0x3fff)) /* MF or a fragment offset */
		return XDPTURN_PASS_FRAGMENT;
	if (csum_ipv4_header((const __u16 *)ip) != 0)
		return XDPTURN_PASS_BAD_IPV4_CHECKSUM;
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < sizeof(*ip) + sizeof(struct udphdr))
		return XDPTURN_PASS_BAD_LENGTH;
	if ((void *)ip + tot_len > c->end)
		return XDPTURN_PASS_TRUNCATED;

	p->family = XDPTURN_FAMILY_IPV4;
	p->src.w[0] = 0;
	p->src.w[1] = 0;
	p->src.h[4] = 0;
	p->src.h[5] = 0xffff;
	p->dst = p->src;
	p->src.w[3] = ip->saddr;
	p->dst.w[3] = ip->daddr;
	p->ttl = ip->ttl;
	p->tos = ip->tos;
	p->udp_len = tot_len - sizeof(*ip);
	return PARSE_OK;
}

/* IPv6 header with UDP right after it; extension headers go to the stack. */
static __always_inline int parse_ipv6(struct cursor *c, struct packet *p)
{
	struct ipv6hdr *ip6 = cursor_take(c, sizeof(*ip6));
	__u16 payload_len;

	if (!ip6)
		return XDPTURN_PASS_TRUNCATED;
	if (ip6->version != 6)
		return XDPTURN_PASS_NOT_IP;
	switch (ip6->nexthdr) {
	case IPPROTO_UDP:
		break;
	case IPPROTO_FRAGMENT:
		return XDPTURN_PASS_FRAGMENT;
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case 135: /* Mobility */
	case 139: /* HIP */
	case 140: /* Shim6 */
		return XDPTURN_PASS_IPV6_EXTENSION;
	default:
		return XDPTURN_PASS_NOT_UDP;
	}
	payload_len = bpf_ntohs(ip6->payload_len);
	if (payload_len < sizeof(struct udphdr))
		return XDPTURN_PASS_BAD_LENGTH;
	if ((void *)(ip6 + 1) + payload_len > c->end)
		return XDPTURN_PASS_TRUNCATED;

	p->family = XDPTURN_FAMILY_IPV6;
	__builtin_memcpy(&p->src, &ip6->saddr, 16);
	__builtin_memcpy(&p->dst, &ip6->daddr, 16);
	p->ttl = ip6->hop_limit;
	p->tos = (bpf_ntohl(*(__be32 *)ip6) >> 20) & 0xff;
	p->udp_len = payload_len;
	return PARSE_OK;
}

/* Is `ip` (of `family`) one of the relay's own addresses, public or local? */
static __always_inline int is_relay_addr(const union xdpturn_ip *ip, __u8 family)
{
	struct xdpturn_addr_key key = {};

	__builtin_memcpy(key.addr, ip, 16);
	key.family = family;
	return bpf_map_lookup_elem(&relay_addrs, &key) != NULL;
}

/* Sum of the ChannelData header and the 0-3 padding bytes after its payload: what disappears from
 * the UDP checksum when the message is unwrapped. The padding is read from the last 4 bytes of the
 * datagram (the ChannelData header guarantees at least 4). */
static __always_inline __u64 channel_strip_sum(struct xdp_md *ctx, const struct packet *p,
					       const struct channel_hdr *chd, __u32 udp_off, __u32 pad)
{
	__u64 sum = (__u64)chd->channel + chd->len;
	__u8 tail[4];

	if (pad == 0)
		return sum;
	if (bpf_xdp_load_bytes(ctx, udp_off + p->udp_len - 4, tail, 4))
		return sum; /* cannot happen: the IP length was checked against the frame */
#pragma unroll
	for (__u32 i = 1; i <= 3; i++)
		if (i <= pad)
			sum += csum_byte(tail[4 - i], p->udp_len - i);
	return sum;
}

/* ChannelData from a client on the TURN port. */
static __always_inline int handle_channel(struct xdp_md *ctx, struct cursor *c, struct packet *p,
					  const struct xdpturn_config *cfg, __u32 udp_off)
{
	struct xdpturn_chan_key key = {};
	struct xdpturn_udp_key hairpin_key = {};
	struct xdpturn_chan_value *route;
	struct xdpturn_udp_value *other;
	struct channel_hdr *chd;
	__u16 channel, payload_len = p->udp_len - sizeof(struct udphdr);
	__u32 pad;

	if (payload_len < sizeof(*chd))
		return guard_drop(XDPTURN_DROP_NOT_TURN_MESSAGE, XDPTURN_PASS_TRUNCATED);
	chd = cursor_take(c, sizeof(*chd));
	if (!chd)
		return exit_pass(XDPTURN_PASS_TRUNCATED);
	if ((chd->channel & bpf_htons(0xc000)) == 0)
		return guard_stun(p, chd, c->end);
	channel = bpf_ntohs(chd->channel);
	if (channel < 0x4000 || channel > 0x7fff) /* RFC 5766 range, as the Python relay */
		return guard_drop(XDPTURN_DROP_NOT_TURN_MESSAGE, XDPTURN_PASS_BAD_CHANNEL_NUMBER);
	p->chan_len = bpf_ntohs(chd->len);
	if ((__u32)p->chan_len + sizeof(*chd) > payload_len)
		return guard_drop(XDPTURN_DROP_BAD_CHANNEL_DATA, XDPTURN_PASS_BAD_CHANNEL_LENGTH);
	pad = payload_len - sizeof(*chd) - p->chan_len;
	if (pad > 3) /* Python ignores any padding; the program only unwraps up to 3 bytes */
		return guard_channel_miss(p, XDPTURN_PASS_BAD_CHANNEL_LENGTH);
	p->channel = chd->channel;
	p->chan_strip_sum = channel_strip_sum(ctx, p, chd, udp_off, pad);

	__builtin_memcpy(key.client_addr, &p->src, 16);
	key.client_port = p->sport;
	key.channel = p->channel;
	key.family = p->family;
	route = bpf_map_lookup_elem(&chan_to_udp, &key);
	if (!route)
		return guard_channel_miss(p, XDPTURN_PASS_NO_CHANNEL);
	if (p->ttl <= 1)
		return exit_pass(XDPTURN_PASS_TTL_EXPIRED);

	union xdpturn_ip peer;
	int verdict;
	__builtin_memcpy(&peer, route->peer_addr, 16);
	if (!is_relay_addr(&peer, route->peer_family)) {
		verdict = meter_admit(p, route->relay_port, 0, p->chan_len);
		if (verdict >= 0)
			return verdict;
		if (p->family == XDPTURN_FAMILY_IPV4)
			return route->peer_family == XDPTURN_FAMILY_IPV4
				       ? from_ipv4_channel_to_ipv4_udp(ctx, p, route, cfg)
				       : from_ipv4_channel_to_ipv6_udp(ctx, p, route, cfg);
		return route->peer_family == XDPTURN_FAMILY_IPV4
			       ? from_ipv6_channel_to_ipv4_udp(ctx, p, route, cfg)
			       : from_ipv6_channel_to_ipv6_udp(ctx, p, route, cfg);
	}

	/* The peer is the relay itself: the packet is for the allocation at (peer address, peer
	 * port), coming from our relayed address (peer address, relay port). */
	__builtin_memcpy(hairpin_key.peer_addr, route->peer_addr, 16);
	hairpin_key.peer_port = route->relay_port;
	hairpin_key.relay_port = route->peer_port;
	hairpin_key.family = route->peer_family;
	other = bpf_map_lookup_elem(&udp_to_chan, &hairpin_key);
	if (!other)
		return exit_pass(XDPTURN_PASS_HAIRPIN_NO_ROUTE);
	verdict = meter_admit(p, route->relay_port, route->peer_port, p->chan_len);
	if (verdict >= 0)
		return verdict;
	if (p->family == XDPTURN_FAMILY_IPV4)
		return other->client_family == XDPTURN_FAMILY_IPV4
			       ? from_ipv4_channel_to_ipv4_channel(ctx, p, other, cfg)
			       : from_ipv4_channel_to_ipv6_channel(ctx, p, other, cfg);
	return other->client_family == XDPTURN_FAMILY_IPV4
		       ? from_ipv6_channel_to_ipv4_channel(ctx, p, other, cfg)
		       : from_ipv6_channel_to_ipv6_channel(ctx, p, other, cfg);
}

/* UDP from a peer to an allocation port. */
static __always_inline int handle_udp(struct xdp_md *ctx, struct packet *p,
				      const struct xdpturn_config *cfg)
{
	struct xdpturn_udp_key key = {};
	struct xdpturn_udp_value *route;
	__u32 port = bpf_ntohs(p->dport);
	__u32 *users = bpf_map_lookup_elem(&relay_ports, &port);
	int verdict;

	if (!users || *users == 0)
		return guard_peer_miss(p, XDPTURN_PASS_NOT_TURN, is_relay_addr(&p->src, p->family));
	__builtin_memcpy(key.peer_addr, &p->src, 16);
	key.peer_port = p->sport;
	key.relay_port = p->dport;
	key.family = p->family;
	route = bpf_map_lookup_elem(&udp_to_chan, &key);
	if (!route)
		return guard_peer_miss(p, XDPTURN_PASS_NO_PEER, is_relay_addr(&p->src, p->family));
	if (p->ttl <= 1)
		return exit_pass(XDPTURN_PASS_TTL_EXPIRED);
	verdict = meter_admit(p, 0, p->dport, p->udp_len - sizeof(struct udphdr));
	if (verdict >= 0)
		return verdict;

	if (p->family == XDPTURN_FAMILY_IPV4)
		return route->client_family == XDPTURN_FAMILY_IPV4
			       ? from_ipv4_udp_to_ipv4_channel(ctx, p, route, cfg)
			       : from_ipv4_udp_to_ipv6_channel(ctx, p, route, cfg);
	return route->client_family == XDPTURN_FAMILY_IPV4
		       ? from_ipv6_udp_to_ipv4_channel(ctx, p, route, cfg)
		       : from_ipv6_udp_to_ipv6_channel(ctx, p, route, cfg);
}

/* Builds with -DXDPTURN_BUILD_ID=N differ in their instructions and in nothing else: the upgrade
 * test replaces a running program with such a build (tests/e2e/test_restart.py). */
#ifndef XDPTURN_BUILD_ID
#define XDPTURN_BUILD_ID 0
#endif

SEC("xdp")
int xdpturn(struct xdp_md *ctx)
{
	__u32 build = XDPTURN_BUILD_ID;
	struct cursor c = {
		.pos = (void *)(long)ctx->data,
		.end = (void *)(long)ctx->data_end,
	};
	struct packet p = {};
	struct xdpturn_config *cfg;
	struct ethhdr *eth;
	struct udphdr *udp;
	__u32 zero = 0, udp_off;
	int rc;

	asm volatile("" : "+r"(build)); /* kept: the one instruction that tells builds apart */
	eth = cursor_take(&c, sizeof(*eth));
	if (!eth)
		return exit_pass(XDPTURN_PASS_TRUNCATED);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		rc = parse_ipv4(&c, &p);
		udp_off = sizeof(*eth) + sizeof(struct iphdr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		rc = parse_ipv6(&c, &p);
		udp_off = sizeof(*eth) + sizeof(struct ipv6hdr);
	} else {
		return exit_pass(XDPTURN_PASS_NOT_IP);
	}
	if (rc != PARSE_OK)
		return exit_pass(rc);

	udp = cursor_take(&c, sizeof(*udp));
	if (!udp)
		return exit_pass(XDPTURN_PASS_TRUNCATED);
	if (bpf_ntohs(udp->len) != p.udp_len)
		return exit_pass(XDPTURN_PASS_BAD_LENGTH);
	p.sport = udp->source;
	p.dport = udp->dest;
	p.udp_check = udp->check;

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || cfg->turn_port == 0)
		return exit_pass(XDPTURN_PASS_NO_CONFIG);
	if (!is_relay_addr(&p.dst, p.family))
		return exit_pass(XDPTURN_PASS_NOT_TURN);
	/* Over IPv6 a zero UDP checksum is invalid (RFC 8200 section 8.1); the stack decides. */
	if (p.family == XDPTURN_FAMILY_IPV6 && p.udp_check == 0)
		return exit_pass(XDPTURN_PASS_ZERO_CHECKSUM);

	if (p.dport == cfg->turn_port)
		return handle_channel(ctx, &c, &p, cfg, udp_off);
	return handle_udp(ctx, &p, cfg);
}

/* What the leaves share: choosing the output (the next hop), writing headers, sending. */
#ifndef XDPTURN_EMIT_H
#define XDPTURN_EMIT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "csum.h"
#include "maps.h"
#include "meter.h"
#include "packet.h"

#define XDPTURN_AF_INET 2
#define XDPTURN_AF_INET6 10
#define XDPTURN_IPV4_HLEN 20
#define XDPTURN_IPV6_HLEN 40
#define XDPTURN_UDP_HLEN 8
#define XDPTURN_CHANNEL_HLEN 4
#define XDPTURN_IP_DF 0x4000

/* The packet to send: outer addresses and ports, and the next hop once found. */
struct egress {
	union xdpturn_ip src;
	union xdpturn_ip dst;
	__be16 sport;
	__be16 dport;
	__u16 udp_len; /* host order */
	__u8 family;
	struct meter_mark meter; /* the input's, counted when sent */
	/* The next hop: ifindex, smac and dmac, from next_hops or filled in by bpf_fib_lookup. */
	struct bpf_fib_lookup fib;
};

static __always_inline __u16 egress_ip_len(const struct egress *eg)
{
	return eg->udp_len + (eg->family == XDPTURN_FAMILY_IPV4 ? XDPTURN_IPV4_HLEN : XDPTURN_IPV6_HLEN);
}

/* The configured source address in `family` into `ip`; 0 when none is configured. */
static __always_inline int config_local(union xdpturn_ip *ip, const struct xdpturn_config *cfg,
					__u8 family)
{
	if (family == XDPTURN_FAMILY_IPV4) {
		__be32 v4;

		__builtin_memcpy(&v4, cfg->local_ipv4, 4);
		if (!v4)
			return 0;
		ip->w[0] = 0;
		ip->w[1] = 0;
		ip->h[4] = 0;
		ip->h[5] = 0xffff;
		ip->w[3] = v4;
		return 1;
	}
	__builtin_memcpy(ip, cfg->local_ipv6, 16);
	return (ip->w[0] | ip->w[1] | ip->w[2] | ip->w[3]) != 0;
}

/* The next hop from bpf_fib_lookup, for a destination not in next_hops. The kernel answers only
 * for an ingress device with forwarding on (a router); on a host it says FWD_DISABLED and the
 * packet waits in Python for the loader to fill next_hops. */
static __always_inline int egress_fib(struct xdp_md *ctx, const struct packet *in,
				      struct egress *eg, int have_src)
{
	struct bpf_fib_lookup *fib = &eg->fib;
	long rc;

	fib->l4_protocol = IPPROTO_UDP;
	fib->sport = eg->sport;
	fib->dport = eg->dport;
	/* Set so that the kernel checks the egress MTU (FRAG_NEEDED). */
	fib->tot_len = egress_ip_len(eg);
	fib->ifindex = ctx->ingress_ifindex;
	if (eg->family == XDPTURN_FAMILY_IPV4) {
		fib->family = XDPTURN_AF_INET;
		fib->tos = in->tos;
		fib->ipv4_src = eg->src.w[3];
		fib->ipv4_dst = eg->dst.w[3];
	} else {
		fib->family = XDPTURN_AF_INET6;
		__builtin_memcpy(fib->ipv6_src, &eg->src, 16);
		__builtin_memcpy(fib->ipv6_dst, &eg->dst, 16);
	}

	rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), have_src ? 0 : BPF_FIB_LOOKUP_SRC);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		break;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		return XDPTURN_PASS_NO_NEIGHBOUR;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		return XDPTURN_PASS_TOO_BIG;
	case BPF_FIB_LKUP_RET_FWD_DISABLED:
		return XDPTURN_PASS_NO_NEXT_HOP;
	default:
		return XDPTURN_PASS_FIB_FAILED;
	}
	if (!have_src) {
		if (eg->family == XDPTURN_FAMILY_IPV4)
			eg->src.w[3] = fib->ipv4_src;
		else
			__builtin_memcpy(&eg->src, fib->ipv6_src, 16);
	}
	return -1;
}

/* Checks that must pass before the buffer is touched: checksum rules, the next hop and the MTU.
 * Fills the source address and the next hop. Returns a pass reason, or -1 when the packet can go.
 * Nothing is written to the packet here, so every failure can still hand the original to the
 * stack. */
static __always_inline int egress_prepare(struct xdp_md *ctx, const struct packet *in,
					  struct egress *eg, const struct xdpturn_config *cfg)
{
	struct xdpturn_addr_key key = {};
	struct xdpturn_next_hop *nh;
	int have_src;

	eg->meter = in->meter;
	/* UDP over IPv6 must carry a checksum (RFC 8200 8.1); we cannot compute a full one here. */
	if (in->udp_check == 0 && eg->family == XDPTURN_FAMILY_IPV6)
		return XDPTURN_PASS_ZERO_CHECKSUM;

	/* The IPv4-mapped prefix of an IPv4 source; its last word comes from the config or later. */
	eg->src.w[0] = 0;
	eg->src.w[1] = 0;
	eg->src.h[4] = 0;
	eg->src.h[5] = eg->family == XDPTURN_FAMILY_IPV4 ? 0xffff : 0;
	have_src = config_local(&eg->src, cfg, eg->family);

	__builtin_memcpy(key.addr, &eg->dst, 16);
	key.family = eg->family;
	nh = bpf_map_lookup_elem(&next_hops, &key);
	if (!nh)
		return egress_fib(ctx, in, eg, have_src);
	if (egress_ip_len(eg) > nh->mtu)
		return XDPTURN_PASS_TOO_BIG;
	if (!have_src)
		__builtin_memcpy(&eg->src, nh->src, 16);
	eg->fib.ifindex = nh->ifindex;
	__builtin_memcpy(eg->fib.smac, nh->smac, ETH_ALEN);
	__builtin_memcpy(eg->fib.dmac, nh->dmac, ETH_ALEN);
	return -1;
}

static __always_inline void write_eth(struct ethhdr *eth, const struct egress *eg)
{
	__builtin_memcpy(eth->h_dest, eg->fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eg->fib.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(eg->family == XDPTURN_FAMILY_IPV4 ? ETH_P_IP : ETH_P_IPV6);
}

/* A fresh IPv4 header: DF like the stack's UDP sockets, ID 0, TTL one less than the input's. */
static __always_inline void write_ipv4(struct iphdr *ip, const struct packet *in,
				       const struct egress *eg)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = in->tos;
	ip->tot_len = bpf_htons(egress_ip_len(eg));
	ip->id = 0;
	ip->frag_off = bpf_htons(XDPTURN_IP_DF);
	ip->ttl = in->ttl - 1;
	ip->protocol = IPPROTO_UDP;
	ip->check = 0;
	ip->saddr = eg->src.w[3];
	ip->daddr = eg->dst.w[3];
	ip->check = csum_ipv4_header((const __u16 *)ip);
}

/* A fresh IPv6 header: traffic class copied, flow label 0 (a new flow), hop limit decremented. */
static __always_inline void write_ipv6(struct ipv6hdr *ip6, const struct packet *in,
				       const struct egress *eg)
{
	*(__be32 *)ip6 = bpf_htonl((6U << 28) | ((__u32)in->tos << 20));
	ip6->payload_len = bpf_htons(eg->udp_len);
	ip6->nexthdr = IPPROTO_UDP;
	ip6->hop_limit = in->ttl - 1;
	__builtin_memcpy(&ip6->saddr, &eg->src, 16);
	__builtin_memcpy(&ip6->daddr, &eg->dst, 16);
}

static __always_inline void write_udp(struct udphdr *udp, const struct egress *eg, __u16 check)
{
	udp->source = eg->sport;
	udp->dest = eg->dport;
	udp->len = bpf_htons(eg->udp_len);
	udp->check = check;
}

/* The checksum sums of the fields the rewrite replaces, on the input side and the output side. */
static __always_inline __u64 csum_in_fields(const struct packet *in)
{
	return csum_udp_fields(&in->src, &in->dst, in->family, in->sport, in->dport, in->udp_len);
}

static __always_inline __u64 csum_out_fields(const struct egress *eg)
{
	return csum_udp_fields(&eg->src, &eg->dst, eg->family, eg->sport, eg->dport, eg->udp_len);
}

/* What follows the UDP header of the output. */
enum egress_tail {
	TAIL_NONE,           /* the payload (to a peer) */
	TAIL_RENUMBER,       /* the input's ChannelData header: only the channel number changes */
	TAIL_CHANNEL_HEADER, /* a new ChannelData header: number and length */
};

/* Write Ethernet, IP (eg->family), UDP and the ChannelData header `tail` says at the start of the
 * frame. Returns 0, or -1 if the frame is shorter than those headers (cannot happen: the input
 * was at least as long). Each family's branch checks its own bounds right before writing, so the
 * verifier sees them together even where the compiler merges the leaves' copies of this code. */
static __always_inline int egress_write(struct xdp_md *ctx, const struct packet *in,
					const struct egress *eg, __u16 check, enum egress_tail tail,
					__be16 channel, __u16 chan_len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct channel_hdr *chd;
	struct udphdr *udp;
	__u32 tail_len = tail == TAIL_NONE ? 0 : XDPTURN_CHANNEL_HLEN;

	if (eg->family == XDPTURN_FAMILY_IPV4) {
		struct iphdr *ip = data + ETH_HLEN;

		udp = (void *)(ip + 1);
		if ((void *)(udp + 1) + tail_len > data_end)
			return -1;
		write_ipv4(ip, in, eg);
	} else {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) + tail_len > data_end)
			return -1;
		write_ipv6(ip6, in, eg);
	}
	write_eth(eth, eg);
	write_udp(udp, eg, check);
	chd = (void *)(udp + 1);
	if (tail != TAIL_NONE) {
		if ((void *)(chd + 1) > data_end)
			return -1;
		chd->channel = channel;
		if (tail == TAIL_CHANNEL_HEADER)
			chd->len = bpf_htons(chan_len);
	}
	return 0;
}

/* Move the frame's start by `delta` bytes (positive: shrink, negative: grow, 0: in place) and
 * write the output's headers; returns the verdict to exit with when that fails, else -1. */
static __always_inline int egress_frame(struct xdp_md *ctx, int delta, const struct packet *in,
					const struct egress *eg, __u16 check, enum egress_tail tail,
					__be16 channel, __u16 chan_len)
{
	if (delta && bpf_xdp_adjust_head(ctx, delta))
		return exit_pass(XDPTURN_PASS_ADJUST_FAILED); /* nothing written yet */
	/* bpf_xdp_adjust_head invalidated every packet pointer: egress_write takes fresh ones. */
	if (egress_write(ctx, in, eg, check, tail, channel, chan_len))
		return exit_drop(XDPTURN_DROP_REWRITTEN_TRUNCATED);
	return -1;
}

/* Cut what follows the new UDP datagram (ChannelData padding, an Ethernet trailer), count, send. */
static __always_inline int egress_send(struct xdp_md *ctx, const struct egress *eg,
				       enum xdpturn_route route)
{
	__u32 want = ETH_HLEN + egress_ip_len(eg);
	__u32 have = ctx->data_end - ctx->data;
	int action;

	/* Shrinking by a few bytes cannot fail for a frame this long; if it did, the excess would only
	 * be an Ethernet trailer beyond the IP length, so the packet is sent regardless. */
	if (have > want)
		bpf_xdp_adjust_tail(ctx, -(int)(have - want));

	if (eg->fib.ifindex == ctx->ingress_ifindex)
		action = XDP_TX;
	else
		action = bpf_redirect(eg->fib.ifindex, 0);
	meter_count(&eg->meter);
	return exit_forward(route, want, action);
}

/* Fill `eg` for plain UDP to a peer, from the allocation port. */
static __always_inline void egress_to_peer(struct egress *eg, const struct xdpturn_chan_value *route,
					   __u8 family, __u16 payload_len)
{
	eg->family = family;
	__builtin_memcpy(&eg->dst, route->peer_addr, 16);
	eg->sport = route->relay_port;
	eg->dport = route->peer_port;
	eg->udp_len = XDPTURN_UDP_HLEN + payload_len;
}

/* Fill `eg` for ChannelData to a client, from the TURN port. */
static __always_inline void egress_to_client(struct egress *eg, const struct xdpturn_udp_value *route,
					     const struct xdpturn_config *cfg, __u8 family,
					     __u16 udp_len)
{
	eg->family = family;
	__builtin_memcpy(&eg->dst, route->client_addr, 16);
	eg->sport = cfg->turn_port;
	eg->dport = route->client_port;
	eg->udp_len = udp_len;
}

#endif /* XDPTURN_EMIT_H */

/* What the leaves share: choosing the output (next hop via the FIB), writing headers, sending. */
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
#include "packet.h"

#define XDPTURN_AF_INET 2
#define XDPTURN_AF_INET6 10
#define XDPTURN_IPV4_HLEN 20
#define XDPTURN_IPV6_HLEN 40
#define XDPTURN_UDP_HLEN 8
#define XDPTURN_CHANNEL_HLEN 4
#define XDPTURN_IP_DF 0x4000

/* The packet to send: outer addresses and ports, and the next hop once looked up. */
struct egress {
	union xdpturn_ip src;
	union xdpturn_ip dst;
	__be16 sport;
	__be16 dport;
	__u16 udp_len; /* host order */
	__u8 family;
	struct bpf_fib_lookup fib;
};

static __always_inline __u16 egress_ip_len(const struct egress *eg)
{
	return eg->udp_len + (eg->family == XDPTURN_FAMILY_IPV4 ? XDPTURN_IPV4_HLEN : XDPTURN_IPV6_HLEN);
}

/* Our source address in `family` from the config. */
static __always_inline void config_local(union xdpturn_ip *ip, const struct xdpturn_config *cfg,
					 __u8 family)
{
	if (family == XDPTURN_FAMILY_IPV4) {
		ip->w[0] = 0;
		ip->w[1] = 0;
		ip->h[4] = 0;
		ip->h[5] = 0xffff;
		__builtin_memcpy(&ip->w[3], cfg->local_ipv4, 4);
	} else {
		__builtin_memcpy(ip, cfg->local_ipv6, 16);
	}
}

/* Checks that must pass before the buffer is touched: checksum rules, TTL, and the next hop. Returns
 * a pass reason, or -1 when the packet can go. Nothing is written to the packet here, so every
 * failure can still hand the original to the stack. */
static __always_inline int egress_prepare(struct xdp_md *ctx, const struct packet *in,
					  struct egress *eg)
{
	struct bpf_fib_lookup *fib = &eg->fib;
	long rc;

	/* UDP over IPv6 must carry a checksum (RFC 8200 8.1); we cannot compute a full one here. */
	if (in->udp_check == 0 && eg->family == XDPTURN_FAMILY_IPV6)
		return XDPTURN_PASS_ZERO_CHECKSUM;

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

	rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		return -1;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		return XDPTURN_PASS_NO_NEIGHBOUR;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		return XDPTURN_PASS_TOO_BIG;
	case BPF_FIB_LKUP_RET_FWD_DISABLED:
		return XDPTURN_PASS_FORWARDING_DISABLED;
	default:
		return XDPTURN_PASS_FIB_FAILED;
	}
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

/* Move the frame's start by `delta` bytes (positive: shrink, negative: grow, 0: in place) and
 * return it once `len` bytes of headers are known to lie inside the frame; else NULL with *reason
 * set. bpf_xdp_adjust_head invalidates every packet pointer, so each leaf takes fresh ones here. */
static __always_inline void *egress_frame(struct xdp_md *ctx, int delta, __u32 len, int *reason)
{
	void *data, *data_end;

	if (delta && bpf_xdp_adjust_head(ctx, delta)) {
		*reason = XDPTURN_PASS_ADJUST_FAILED;
		return NULL;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + len > data_end) {
		*reason = XDPTURN_PASS_INTERNAL_DROP;
		return NULL;
	}
	return data;
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
	return exit_forward(route, want, action);
}

/* Fill `eg` for plain UDP to a peer, from the allocation port. */
static __always_inline void egress_to_peer(struct egress *eg, const struct xdpturn_chan_value *route,
					   const struct xdpturn_config *cfg, __u16 payload_len)
{
	eg->family = route->peer_family;
	config_local(&eg->src, cfg, eg->family);
	__builtin_memcpy(&eg->dst, route->peer_addr, 16);
	eg->sport = route->relay_port;
	eg->dport = route->peer_port;
	eg->udp_len = XDPTURN_UDP_HLEN + payload_len;
}

/* Fill `eg` for ChannelData to a client, from the TURN port. */
static __always_inline void egress_to_client(struct egress *eg, const struct xdpturn_udp_value *route,
					     const struct xdpturn_config *cfg, __u16 udp_len)
{
	eg->family = route->client_family;
	config_local(&eg->src, cfg, eg->family);
	__builtin_memcpy(&eg->dst, route->client_addr, 16);
	eg->sport = cfg->turn_port;
	eg->dport = route->client_port;
	eg->udp_len = udp_len;
}

#endif /* XDPTURN_EMIT_H */

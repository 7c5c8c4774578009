/* UDP from a peer over IPv4 to an allocation port -> ChannelData to the client over
 * IPv6, sent from the TURN port. A 4-byte ChannelData header is added (no padding: over
 * UDP it is optional, RFC 8656 section 12.5).
 */
#ifndef XDPTURN_FROM_IPV4_UDP_TO_IPV6_CHANNEL_H
#define XDPTURN_FROM_IPV4_UDP_TO_IPV6_CHANNEL_H

#include "../emit.h"

static __always_inline int from_ipv4_udp_to_ipv6_channel(struct xdp_md *ctx, const struct packet *in,
                                                       const struct xdpturn_udp_value *route,
                                                       const struct xdpturn_config *cfg)
{
	struct egress eg = {};
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	struct udphdr *udp;
	struct channel_hdr *chd;
	__u16 check = 0;
	int reason;

	egress_to_client(&eg, route, cfg, in->udp_len + XDPTURN_CHANNEL_HLEN);
	reason = egress_prepare(ctx, in, &eg);
	if (reason >= 0)
		return exit_pass(reason);
	/* A zero IPv4 checksum stays zero (egress_prepare passed the IPv6 case). */
	if (in->udp_check)
		check = csum_udp_replace(in->udp_check, csum_in_fields(in),
					 csum_out_fields(&eg) + route->channel + bpf_htons(in->udp_len - XDPTURN_UDP_HLEN));

	/* Eth+IPv4+UDP (42) -> Eth+IPv6+UDP+ChannelData (66): grow the front by 24. */
	eth = egress_frame(ctx, -24, sizeof(*eth) + sizeof(*ip6) + sizeof(*udp) + sizeof(*chd), &reason);
	if (!eth)
		return exit_pass(reason);
	ip6 = (void *)(eth + 1);
	udp = (void *)(ip6 + 1);
	chd = (void *)(udp + 1);

	write_eth(eth, &eg);
	write_ipv6(ip6, in, &eg);
	write_udp(udp, &eg, check);
	chd->channel = route->channel;
	chd->len = bpf_htons(in->udp_len - XDPTURN_UDP_HLEN);
	return egress_send(ctx, &eg, XDPTURN_ROUTE_IPV4_UDP_TO_IPV6_CHANNEL);
}

#endif /* XDPTURN_FROM_IPV4_UDP_TO_IPV6_CHANNEL_H */

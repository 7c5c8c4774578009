/* ChannelData from a client over IPv6 -> UDP to its peer over IPv6, sent from
 * the allocation port. The ChannelData header and any padding go.
 */
#ifndef XDPTURN_FROM_IPV6_CHANNEL_TO_IPV6_UDP_H
#define XDPTURN_FROM_IPV6_CHANNEL_TO_IPV6_UDP_H

#include "../emit.h"

static __always_inline int from_ipv6_channel_to_ipv6_udp(struct xdp_md *ctx, const struct packet *in,
                                                       const struct xdpturn_chan_value *route,
                                                       const struct xdpturn_config *cfg)
{
	struct egress eg = {};
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	struct udphdr *udp;
	__u16 check = 0;
	int reason;

	egress_to_peer(&eg, route, cfg, in->chan_len);
	reason = egress_prepare(ctx, in, &eg);
	if (reason >= 0)
		return exit_pass(reason);
	/* A zero IPv4 checksum stays zero (egress_prepare passed the IPv6 case). */
	if (in->udp_check)
		check = csum_udp_replace(in->udp_check, csum_in_fields(in) + in->chan_strip_sum,
					 csum_out_fields(&eg));

	/* Eth+IPv6+UDP+ChannelData (66) -> Eth+IPv6+UDP (62): shrink the front by 4. */
	eth = egress_frame(ctx, 4, sizeof(*eth) + sizeof(*ip6) + sizeof(*udp), &reason);
	if (!eth)
		return exit_pass(reason);
	ip6 = (void *)(eth + 1);
	udp = (void *)(ip6 + 1);

	write_eth(eth, &eg);
	write_ipv6(ip6, in, &eg);
	write_udp(udp, &eg, check);
	return egress_send(ctx, &eg, XDPTURN_ROUTE_IPV6_CHANNEL_TO_IPV6_UDP);
}

#endif /* XDPTURN_FROM_IPV6_CHANNEL_TO_IPV6_UDP_H */

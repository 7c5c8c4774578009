/* ChannelData from a client over IPv4 -> UDP to its peer over IPv4, sent from
 * the allocation port. The ChannelData header and any padding go.
 */
#ifndef XDPTURN_FROM_IPV4_CHANNEL_TO_IPV4_UDP_H
#define XDPTURN_FROM_IPV4_CHANNEL_TO_IPV4_UDP_H

#include "../emit.h"

static __always_inline int from_ipv4_channel_to_ipv4_udp(struct xdp_md *ctx, const struct packet *in,
                                                       const struct xdpturn_chan_value *route,
                                                       const struct xdpturn_config *cfg)
{
	struct egress eg = {};
	struct ethhdr *eth;
	struct iphdr *ip;
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

	/* Eth+IPv4+UDP+ChannelData (46) -> Eth+IPv4+UDP (42): shrink the front by 4. */
	eth = egress_frame(ctx, 4, sizeof(*eth) + sizeof(*ip) + sizeof(*udp), &reason);
	if (!eth)
		return exit_pass(reason);
	ip = (void *)(eth + 1);
	udp = (void *)(ip + 1);

	write_eth(eth, &eg);
	write_ipv4(ip, in, &eg);
	write_udp(udp, &eg, check);
	return egress_send(ctx, &eg, XDPTURN_ROUTE_IPV4_CHANNEL_TO_IPV4_UDP);
}

#endif /* XDPTURN_FROM_IPV4_CHANNEL_TO_IPV4_UDP_H */

/* ChannelData from a client over IPv6 -> UDP to its peer over IPv4, sent from
 * the allocation port. The ChannelData header and any padding go.
 */
#ifndef XDPTURN_FROM_IPV6_CHANNEL_TO_IPV4_UDP_H
#define XDPTURN_FROM_IPV6_CHANNEL_TO_IPV4_UDP_H

#include "../leaves.h"

/* Eth+IPv6+UDP+ChannelData (66) -> Eth+IPv4+UDP (42): shrink the front by 24. */
static __always_inline int from_ipv6_channel_to_ipv4_udp(struct xdp_md *ctx, const struct packet *in,
                                                         const struct xdpturn_chan_value *route,
                                                         const struct xdpturn_config *cfg)
{
	return channel_to_udp(ctx, in, route, cfg, XDPTURN_FAMILY_IPV4, 24,
			      XDPTURN_ROUTE_IPV6_CHANNEL_TO_IPV4_UDP);
}

#endif /* XDPTURN_FROM_IPV6_CHANNEL_TO_IPV4_UDP_H */

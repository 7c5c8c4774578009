/* Packets to itself: ChannelData from a client over IPv4 whose peer is the relay's own
 * address goes straight to the other allocation's client as ChannelData over IPv6
 * (channel renumbered, payload and padding kept), never onto the wire to ourselves.
 */
#ifndef XDPTURN_FROM_IPV4_CHANNEL_TO_IPV6_CHANNEL_H
#define XDPTURN_FROM_IPV4_CHANNEL_TO_IPV6_CHANNEL_H

#include "../leaves.h"

/* Eth+IPv4+UDP+ChannelData (46) -> Eth+IPv6+UDP+ChannelData (66): grow the front by 20. */
static __always_inline int from_ipv4_channel_to_ipv6_channel(struct xdp_md *ctx, const struct packet *in,
                                                             const struct xdpturn_udp_value *route,
                                                             const struct xdpturn_config *cfg)
{
	return channel_to_channel(ctx, in, route, cfg, XDPTURN_FAMILY_IPV6, -20,
				  XDPTURN_ROUTE_IPV4_CHANNEL_TO_IPV6_CHANNEL);
}

#endif /* XDPTURN_FROM_IPV4_CHANNEL_TO_IPV6_CHANNEL_H */

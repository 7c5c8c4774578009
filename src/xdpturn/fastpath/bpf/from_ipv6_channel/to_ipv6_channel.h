/* Packets to itself: ChannelData from a client over IPv6 whose peer is the relay's own
 * address goes straight to the other allocation's client as ChannelData over IPv6
 * (channel renumbered, payload and padding kept), never onto the wire to ourselves.
 */
#ifndef XDPTURN_FROM_IPV6_CHANNEL_TO_IPV6_CHANNEL_H
#define XDPTURN_FROM_IPV6_CHANNEL_TO_IPV6_CHANNEL_H

#include "../leaves.h"

/* Eth+IPv6+UDP+ChannelData (66) -> Eth+IPv6+UDP+ChannelData (66): same size, so no bpf_xdp_adjust_head; the headers are rewritten in place. */
static __always_inline int from_ipv6_channel_to_ipv6_channel(struct xdp_md *ctx, const struct packet *in,
                                                             const struct xdpturn_udp_value *route,
                                                             const struct xdpturn_config *cfg)
{
	return channel_to_channel(ctx, in, route, cfg, XDPTURN_FAMILY_IPV6, 0,
				  XDPTURN_ROUTE_IPV6_CHANNEL_TO_IPV6_CHANNEL);
}

#endif /* XDPTURN_FROM_IPV6_CHANNEL_TO_IPV6_CHANNEL_H */

/* UDP from a peer over IPv6 to an allocation port -> ChannelData to the client over
 * IPv6, sent from the TURN port. A 4-byte ChannelData header is added (no padding: over
 * UDP it is optional, RFC 8656 section 12.5).
 */
#ifndef XDPTURN_FROM_IPV6_UDP_TO_IPV6_CHANNEL_H
#define XDPTURN_FROM_IPV6_UDP_TO_IPV6_CHANNEL_H

#include "../leaves.h"

/* Eth+IPv6+UDP (62) -> Eth+IPv6+UDP+ChannelData (66): grow the front by 4. */
static __always_inline int from_ipv6_udp_to_ipv6_channel(struct xdp_md *ctx, const struct packet *in,
                                                         const struct xdpturn_udp_value *route,
                                                         const struct xdpturn_config *cfg)
{
	return udp_to_channel(ctx, in, route, cfg, XDPTURN_FAMILY_IPV6, -4,
			      XDPTURN_ROUTE_IPV6_UDP_TO_IPV6_CHANNEL);
}

#endif /* XDPTURN_FROM_IPV6_UDP_TO_IPV6_CHANNEL_H */

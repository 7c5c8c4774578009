/* UDP from a peer over IPv4 to an allocation port -> ChannelData to the client over
 * IPv4, sent from the TURN port. A 4-byte ChannelData header is added (no padding: over
 * UDP it is optional, RFC 8656 section 12.5).
 */
#ifndef XDPTURN_FROM_IPV4_UDP_TO_IPV4_CHANNEL_H
#define XDPTURN_FROM_IPV4_UDP_TO_IPV4_CHANNEL_H

#include "../leaves.h"

/* Eth+IPv4+UDP (42) -> Eth+IPv4+UDP+ChannelData (46): grow the front by 4. */
static __always_inline int from_ipv4_udp_to_ipv4_channel(struct xdp_md *ctx, const struct packet *in,
                                                         const struct xdpturn_udp_value *route,
                                                         const struct xdpturn_config *cfg)
{
	return udp_to_channel(ctx, in, route, cfg, XDPTURN_FAMILY_IPV4, -4,
			      XDPTURN_ROUTE_IPV4_UDP_TO_IPV4_CHANNEL);
}

#endif /* XDPTURN_FROM_IPV4_UDP_TO_IPV4_CHANNEL_H */

/* The three bodies the 12 leaves share. A leaf (from_X/to_Y.h) names its route, the family of the
 * headers it writes and how far the frame's start moves; everything else is one of these:
 *   - channel_to_udp:     ChannelData from a client -> UDP to its peer (header and padding go);
 *   - channel_to_channel: ChannelData whose peer is the relay itself -> ChannelData to the other
 *                         allocation's client (channel renumbered, length, payload, padding kept);
 *   - udp_to_channel:     UDP from a peer -> ChannelData to the client (4-byte header added, no
 *                         padding: over UDP it is optional, RFC 8656 section 12.5).
 * `family` and `delta` are constants in every caller, so each inlined copy keeps only the branch
 * of its own family. The input's fields were copied into `struct packet` before any rewrite.
 */
#ifndef XDPTURN_LEAVES_H
#define XDPTURN_LEAVES_H

#include "emit.h"

static __always_inline int channel_to_udp(struct xdp_md *ctx, const struct packet *in,
					  const struct xdpturn_chan_value *route,
					  const struct xdpturn_config *cfg, __u8 family, int delta,
					  enum xdpturn_route counter)
{
	struct egress eg = {};
	__u16 check = 0;
	int reason, verdict;

	egress_to_peer(&eg, route, family, in->chan_len);
	reason = egress_prepare(ctx, in, &eg, cfg);
	if (reason >= 0)
		return exit_pass(reason);
	/* A zero IPv4 checksum stays zero (egress_prepare passed the IPv6 case). */
	if (in->udp_check)
		check = csum_udp_replace(in->udp_check, csum_in_fields(in) + in->chan_strip_sum,
					 csum_out_fields(&eg));

	verdict = egress_frame(ctx, delta, in, &eg, check, TAIL_NONE, 0, 0);
	if (verdict >= 0)
		return verdict;
	return egress_send(ctx, &eg, counter);
}

static __always_inline int channel_to_channel(struct xdp_md *ctx, const struct packet *in,
					      const struct xdpturn_udp_value *route,
					      const struct xdpturn_config *cfg, __u8 family,
					      int delta, enum xdpturn_route counter)
{
	struct egress eg = {};
	__u16 check = 0;
	int reason, verdict;

	egress_to_client(&eg, route, cfg, family, in->udp_len);
	reason = egress_prepare(ctx, in, &eg, cfg);
	if (reason >= 0)
		return exit_pass(reason);
	if (in->udp_check)
		check = csum_udp_replace(in->udp_check, csum_in_fields(in) + in->channel,
					 csum_out_fields(&eg) + route->channel);

	/* The length, payload and padding stay where they are. */
	verdict = egress_frame(ctx, delta, in, &eg, check, TAIL_RENUMBER, route->channel, 0);
	if (verdict >= 0)
		return verdict;
	return egress_send(ctx, &eg, counter);
}

static __always_inline int udp_to_channel(struct xdp_md *ctx, const struct packet *in,
					  const struct xdpturn_udp_value *route,
					  const struct xdpturn_config *cfg, __u8 family, int delta,
					  enum xdpturn_route counter)
{
	__u16 payload_len = in->udp_len - XDPTURN_UDP_HLEN;
	struct egress eg = {};
	__u16 check = 0;
	int reason, verdict;

	egress_to_client(&eg, route, cfg, family, in->udp_len + XDPTURN_CHANNEL_HLEN);
	reason = egress_prepare(ctx, in, &eg, cfg);
	if (reason >= 0)
		return exit_pass(reason);
	if (in->udp_check)
		check = csum_udp_replace(in->udp_check, csum_in_fields(in),
					 csum_out_fields(&eg) + route->channel + bpf_htons(payload_len));

	verdict = egress_frame(ctx, delta, in, &eg, check, TAIL_CHANNEL_HEADER, route->channel,
			       payload_len);
	if (verdict >= 0)
		return verdict;
	return egress_send(ctx, &eg, counter);
}

#endif /* XDPTURN_LEAVES_H */

/* The parsed input packet and the bounds-checked cursor used to read headers (BPF only). */
#ifndef XDPTURN_PACKET_H
#define XDPTURN_PACKET_H

#include <linux/types.h>

#include "shared.h"

/* An address as 16 bytes (IPv4 mapped into ::ffff:0:0/96), viewable as bytes, words or dwords. */
union xdpturn_ip {
	__u8 b[16];
	__be16 h[8];
	__be32 w[4];
};

/* The 4-byte ChannelData header (RFC 8656 section 12.4). */
struct channel_hdr {
	__be16 channel;
	__be16 len;
};

/* What meter.h counts for a packet once it is sent: allocation ports (host order, 0: none) and
 * payload bytes. Set where the route is decided (meter_admit), carried to egress_send. */
struct meter_mark {
	__u16 from_port; /* the allocation whose client sent it: client_to_peer */
	__u16 to_port;   /* the allocation whose client receives it: peer_to_client */
	__u16 len;
};

/* Everything a leaf needs from the input, copied out of the packet before any rewrite. */
struct packet {
	union xdpturn_ip src;
	union xdpturn_ip dst;
	__be16 sport;
	__be16 dport;
	__u16 udp_len;   /* host order, equal to the IP payload length */
	__u16 udp_check; /* as on the wire; 0 means none (IPv4 only) */
	__u8 family;     /* XDPTURN_FAMILY_* */
	__u8 ttl;        /* TTL or hop limit */
	__u8 tos;        /* TOS or traffic class */
	/* ChannelData input only: */
	__be16 channel;
	__u16 chan_len;        /* host order, the ChannelData length field */
	__u64 chan_strip_sum;  /* checksum sum of the ChannelData header and trailing padding */
	struct meter_mark meter;
};

/* Bounds-checked cursor over [pos, end): the only way headers are read from the packet. */
struct cursor {
	void *pos;
	void *end;
};

/* Returns a pointer to the next `len` bytes and advances, or NULL if they run past the end. */
static __always_inline void *cursor_take(struct cursor *c, const __u32 len)
{
	void *p = c->pos;

	if (p + len > c->end)
		return NULL;
	c->pos = p + len;
	return p;
}

#endif /* XDPTURN_PACKET_H */

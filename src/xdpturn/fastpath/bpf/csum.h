/* All checksum arithmetic of the program (RFC 1071 one's complement sums, RFC 1624 updates).
 *
 * Sums are built from 16-bit words exactly as they sit in memory (network order), which the one's
 * complement sum allows (RFC 1071 section 2(B)): a sum of memory-order words folded and stored as is
 * gives the right checksum bytes. Host-order values (lengths) go through bpf_htons first.
 */
#ifndef XDPTURN_CSUM_H
#define XDPTURN_CSUM_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>

#include "packet.h"

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* Sum of an address as the UDP pseudo-header holds it: 2 words for IPv4, 8 for IPv6. */
static __always_inline __u64 csum_addr(const union xdpturn_ip *ip, __u8 family)
{
	__u64 sum = (__u64)ip->h[6] + ip->h[7];

	if (family == XDPTURN_FAMILY_IPV6)
		sum += (__u64)ip->h[0] + ip->h[1] + ip->h[2] + ip->h[3] + ip->h[4] + ip->h[5];
	return sum;
}

/* One byte of the UDP message at byte offset `off` from the UDP header (used for padding that is
 * removed): an even offset is the first byte of a 16-bit word. */
static __always_inline __u64 csum_byte(__u8 byte, __u32 off)
{
	return (off & 1) ? bpf_htons((__u16)byte) : bpf_htons((__u16)byte << 8);
}

/* The fields of a UDP checksum that a relay rewrites: pseudo-header addresses, ports and the
 * length (which appears twice, in the pseudo-header and the UDP header). The protocol number is
 * the same on both sides and is left out. */
static __always_inline __u64 csum_udp_fields(const union xdpturn_ip *src, const union xdpturn_ip *dst,
					     __u8 family, __be16 sport, __be16 dport, __u16 udp_len)
{
	return csum_addr(src, family) + csum_addr(dst, family) + sport + dport +
	       2 * (__u64)bpf_htons(udp_len);
}

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), with m and m' the sums of the old and new fields. A
 * result of 0 is sent as 0xffff, because 0 means "no checksum" in UDP (RFC 768). */
static __always_inline __u16 csum_udp_replace(__u16 check, __u64 old_sum, __u64 new_sum)
{
	__u64 sum = (__u16)~check;

	sum += (__u16)~csum_fold(old_sum);
	sum += csum_fold(new_sum);
	check = (__u16)~csum_fold(sum);
	return check ? check : 0xffff;
}

/* Full IPv4 header checksum (20 bytes, no options): cheaper to recompute than to track every field
 * the rewrite changes. `hdr` must be bounds-checked for 20 bytes and have check = 0. */
static __always_inline __u16 csum_ipv4_header(const __u16 *hdr)
{
	__u64 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += hdr[i];
	return (__u16)~csum_fold(sum);
}

#endif /* XDPTURN_CSUM_H */

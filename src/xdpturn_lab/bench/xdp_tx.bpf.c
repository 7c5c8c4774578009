// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
/* The live-frames load generator's program (xdpturn_lab.bench.livegen). Run with BPF_PROG_TEST_RUN,
 * BPF_F_TEST_XDP_LIVE_FRAMES, an xdp_md naming a veth and `repeat` = frames per call; the kernel
 * turns XDP_TX into a redirect out of that veth, whose peer (it needs an XDP program of its own)
 * receives the frame as if from a NIC.
 *
 * The kernel copies the frame into its page pool once and recycles those pages; whoever handles
 * the frame downstream writes into the same page (a router rewrites the Ethernet header and the
 * TTL, the relay's XDP program rewrites the headers in place). So before each XDP_TX the program
 * writes the template's first TEMPLATE_LEN bytes (all headers) back from the `template` map, which
 * the driver fills once after loading. The payload beyond is never written downstream.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define TEMPLATE_LEN 128 /* Ethernet + IPv6 + UDP + ChannelData is 66; a relay may write ~90 */
#define WORDS (TEMPLATE_LEN / 8)

struct template {
	__u64 words[WORDS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct template);
} template SEC(".maps");

SEC("xdp")
int xdp_tx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct template *t = bpf_map_lookup_elem(&template, &zero);
	__u64 *dst = data;

	if (!t)
		return XDP_ABORTED;
#pragma unroll
	for (int i = 0; i < WORDS; i++) {
		if ((void *)(dst + i + 1) > data_end)
			break;
		dst[i] = t->words[i];
	}
	return XDP_TX;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

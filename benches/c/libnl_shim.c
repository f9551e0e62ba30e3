/* libnl's side of the bench: xfrmnl_ae_parse on a message, the fields read
 * through libnl's getters, the object released, as a libnl user does it. */
#include <stdint.h>
#include <string.h>

#include <netlink/addr.h>
#include <netlink/netlink.h>
#include <netlink/xfrm/ae.h>

/* What libnl gives for one event; the bench compares it field by field. */
struct shim_ae {
	uint8_t daddr[16], saddr[16];
	uint32_t daddr_len, saddr_len;
	int32_t spi, family, proto, reqid, flags;
	int32_t esn; /* 1: ESN state, 0: legacy, -1: none */
	uint32_t oseq, seq, oseq_hi, seq_hi, window, bmp_len;
	uint32_t bmp[128];
	int32_t has_lifetime;
	unsigned long long bytes, packets, add_time, use_time;
	int32_t has_mark;
	uint32_t mark_v, mark_m;
	int32_t replay_maxdiff, replay_maxage; /* -1: not decoded */
};

static void addr(struct nl_addr *a, uint8_t *out, uint32_t *len)
{
	*len = 0;
	if (!a)
		return;
	*len = nl_addr_get_len(a);
	memcpy(out, nl_addr_get_binary_addr(a), *len > 16 ? 16 : *len);
}

/* Everything libnl decodes; 0 or libnl's negative error. */
int shim_parse_full(void *msg, struct shim_ae *out)
{
	struct xfrmnl_ae *ae = NULL;
	int err;

	memset(out, 0, sizeof(*out));
	err = xfrmnl_ae_parse((struct nlmsghdr *)msg, &ae);
	if (err < 0)
		return err;
	addr(xfrmnl_ae_get_daddr(ae), out->daddr, &out->daddr_len);
	addr(xfrmnl_ae_get_saddr(ae), out->saddr, &out->saddr_len);
	out->spi = xfrmnl_ae_get_spi(ae);
	out->family = xfrmnl_ae_get_family(ae);
	out->proto = xfrmnl_ae_get_proto(ae);
	out->reqid = xfrmnl_ae_get_reqid(ae);
	out->flags = xfrmnl_ae_get_flags(ae);
	out->esn = -1;
	if (xfrmnl_ae_get_replay_state(ae, &out->oseq, &out->seq, &out->bmp[0]) == 0) {
		out->esn = 0;
		out->bmp_len = 1;
	} else if (xfrmnl_ae_get_replay_state_esn(ae, &out->oseq, &out->seq, &out->oseq_hi, &out->seq_hi,
						  &out->window, &out->bmp_len, out->bmp) == 0) {
		out->esn = 1;
	}
	out->has_lifetime =
		xfrmnl_ae_get_curlifetime(ae, &out->bytes, &out->packets, &out->add_time, &out->use_time) == 0;
	out->has_mark = xfrmnl_ae_get_mark(ae, &out->mark_m, &out->mark_v) == 0;
	out->replay_maxdiff = xfrmnl_ae_get_replay_maxdiff(ae);
	out->replay_maxage = xfrmnl_ae_get_replay_maxage(ae);
	xfrmnl_ae_put(ae);
	return 0;
}

/* The timed path: parse, read what a sync daemon reads (SPI, reqid, flags,
 * sequence numbers, counters), release. Returns a checksum of the values. */
uint64_t shim_parse_read(void *msg)
{
	struct xfrmnl_ae *ae = NULL;
	unsigned int oseq = 0, seq = 0, bmp = 0, oseq_hi = 0, seq_hi = 0, window = 0, bmp_len = 0;
	unsigned int words[128];
	unsigned long long bytes = 0, packets = 0, add_time = 0, use_time = 0;
	uint64_t sum;

	if (xfrmnl_ae_parse((struct nlmsghdr *)msg, &ae) < 0)
		return 0;
	sum = (uint32_t)xfrmnl_ae_get_spi(ae) + (uint32_t)xfrmnl_ae_get_reqid(ae) + (uint32_t)xfrmnl_ae_get_flags(ae);
	if (xfrmnl_ae_get_replay_state(ae, &oseq, &seq, &bmp) != 0)
		xfrmnl_ae_get_replay_state_esn(ae, &oseq, &seq, &oseq_hi, &seq_hi, &window, &bmp_len, words);
	xfrmnl_ae_get_curlifetime(ae, &bytes, &packets, &add_time, &use_time);
	sum += ((uint64_t)seq_hi << 32 | seq) + ((uint64_t)oseq_hi << 32 | oseq) + bytes + packets;
	xfrmnl_ae_put(ae);
	return sum;
}

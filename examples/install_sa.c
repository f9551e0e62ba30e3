/* Installs an ESP SA that carries its aevent thresholds from the first
 * moment: the way a daemon that builds its own XFRM_MSG_NEWSA (strongSwan's
 * kernel-netlink, an HA product) gives every SA its thresholds, with no
 * window in which the SA runs on the namespace's defaults.
 *
 *   install_sa SRC DST SPI REQID REPLAY_PACKETS TIMER_MS
 *
 * Run it in the SA's network namespace (ip netns exec NAME install_sa ...).
 * It registers a rule for REQID, builds the NEWSA, lets the library append
 * the rule's thresholds, sends it, then reads the SA's thresholds back with
 * GETAE and prints them. Exits 0 only if the kernel reports the rule's.
 *
 * Build like any user of the library:
 *   cc install_sa.c $(pkg-config --cflags --libs xfrmsync) -o install_sa */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netlink.h>
#include <linux/xfrm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <xfrmsync.h>

static int parse_addr(const char *text, uint16_t *family, void *out)
{
	if (inet_pton(AF_INET, text, out) == 1)
		*family = AF_INET;
	else if (inet_pton(AF_INET6, text, out) == 1)
		*family = AF_INET6;
	else
		return -1;
	return 0;
}

static void put_attr(struct nlmsghdr *nlh, uint16_t type, const void *data, size_t len)
{
	struct nlattr *a = (struct nlattr *)((char *)nlh + NLMSG_ALIGN(nlh->nlmsg_len));

	a->nla_type = type;
	a->nla_len = NLA_HDRLEN + len;
	memcpy((char *)a + NLA_HDRLEN, data, len);
	nlh->nlmsg_len = NLMSG_ALIGN(nlh->nlmsg_len) + NLA_ALIGN(a->nla_len);
}

/* An ESP SA in transport mode with AES-GCM, no lifetime limits. */
static void build_newsa(struct nlmsghdr *nlh, uint16_t family, const void *src, const void *dst, uint32_t spi,
			uint32_t reqid)
{
	struct xfrm_usersa_info *sa = NLMSG_DATA(nlh);
	size_t alen = family == AF_INET ? 4 : 16;
	struct {
		struct xfrm_algo_aead algo;
		char key[20];
	} aead;

	nlh->nlmsg_len = NLMSG_LENGTH(sizeof(*sa));
	nlh->nlmsg_type = XFRM_MSG_NEWSA;
	nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
	nlh->nlmsg_seq = 1;
	memcpy(&sa->id.daddr, dst, alen);
	memcpy(&sa->saddr, src, alen);
	sa->id.spi = htonl(spi);
	sa->id.proto = IPPROTO_ESP;
	sa->family = family;
	sa->sel.family = family;
	sa->mode = XFRM_MODE_TRANSPORT;
	sa->reqid = reqid;
	sa->replay_window = 32;
	sa->lft.soft_byte_limit = sa->lft.hard_byte_limit = XFRM_INF;
	sa->lft.soft_packet_limit = sa->lft.hard_packet_limit = XFRM_INF;

	memset(&aead, 0, sizeof(aead));
	strcpy(aead.algo.alg_name, "rfc4106(gcm(aes))");
	aead.algo.alg_key_len = 8 * sizeof(aead.key);
	aead.algo.alg_icv_len = 128;
	memset(aead.key, 0x42, sizeof(aead.key));
	put_attr(nlh, XFRMA_ALG_AEAD, &aead, sizeof(aead));
}

/* Sends the message and returns the kernel's errno for it (0 = done). */
static int send_to_kernel(struct nlmsghdr *nlh)
{
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	char answer[4096];
	struct nlmsghdr *reply = (struct nlmsghdr *)answer;
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_XFRM);
	ssize_t n;

	if (fd < 0)
		return errno;
	if (sendto(fd, nlh, nlh->nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0) {
		close(fd);
		return errno;
	}
	n = recv(fd, answer, sizeof(answer), 0);
	close(fd);
	if (n < (ssize_t)NLMSG_LENGTH(sizeof(struct nlmsgerr)) || reply->nlmsg_type != NLMSG_ERROR)
		return EBADMSG;
	return -((struct nlmsgerr *)NLMSG_DATA(reply))->error;
}

int main(int argc, char **argv)
{
	union {
		struct nlmsghdr nlh;
		char bytes[1024];
	} msg;
	xfrmsync_handle *h;
	xfrmsync_rule rule;
	xfrmsync_sa_id id;
	xfrmsync_aevent ev;
	unsigned char src[16], dst[16];
	uint16_t family;
	int rc;

	if (argc != 7 || parse_addr(argv[1], &family, src) || parse_addr(argv[2], &family, dst)) {
		fprintf(stderr, "usage: install_sa SRC DST SPI REQID REPLAY_PACKETS TIMER_MS\n");
		return 2;
	}
	if ((rc = xfrmsync_handle_new(&h)) < 0) {
		fprintf(stderr, "install_sa: %s\n", xfrmsync_last_error());
		return 1;
	}
	memset(&rule, 0, sizeof(rule));
	rule.name = "install-example";
	rule.match = XFRMSYNC_MATCH_REQID;
	rule.reqid = strtoul(argv[4], NULL, 0);
	rule.replay_threshold = strtoul(argv[5], NULL, 0);
	rule.timer_threshold_ms = strtoul(argv[6], NULL, 0);
	if ((rc = xfrmsync_rule_add(h, &rule)) < 0) {
		fprintf(stderr, "install_sa: rule: %s\n", xfrmsync_last_error());
		return 1;
	}

	memset(&msg, 0, sizeof(msg));
	build_newsa(&msg.nlh, family, src, dst, strtoul(argv[3], NULL, 0), rule.reqid);
	rc = xfrmsync_newsa_add_thresholds(h, &msg, sizeof(msg));
	if (rc <= 0) {
		fprintf(stderr, "install_sa: no thresholds appended (%d): %s\n", rc, rc ? xfrmsync_last_error() : "no rule");
		return 1;
	}
	printf("NEWSA of %d bytes with thresholds appended\n", rc);
	if ((rc = send_to_kernel(&msg.nlh)) != 0) {
		fprintf(stderr, "install_sa: the kernel refused the SA: %s\n", strerror(rc));
		return 1;
	}

	memset(&id, 0, sizeof(id));
	memcpy(id.daddr, dst, sizeof(dst));
	id.family = family;
	id.proto = IPPROTO_ESP;
	id.spi = strtoul(argv[3], NULL, 0);
	if ((rc = xfrmsync_query(h, &id, XFRMSYNC_QUERY_THRESHOLDS, &ev)) < 0) {
		fprintf(stderr, "install_sa: query: %s\n", xfrmsync_last_error());
		return 1;
	}
	printf("installed: replay-threshold %u timer-threshold %ums\n", ev.replay_threshold, ev.timer_threshold_ms);
	xfrmsync_handle_free(h);
	/* The kernel reads the timer back in whole 100 ms steps. */
	return ev.replay_threshold == rule.replay_threshold &&
			       ev.timer_threshold_ms == rule.timer_threshold_ms / 100 * 100
		       ? 0
		       : 1;
}

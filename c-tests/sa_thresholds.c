/* Lists every SA of the caller's network namespace with its aevent
 * thresholds, read two ways: the kernel's raw XFRM_MSG_GETAE answer
 * (XFRMA_REPLAY_THRESH in packets, XFRMA_ETIMER_THRESH in the kernel's
 * 100 ms units) and libxfrmsync's xfrmsync_query(XFRMSYNC_QUERY_THRESHOLDS).
 * A marked SA's raw answer takes two GETAEs, one threshold each (Linux
 * 5.10 panics on one asking both about an SA with a mark and an if_id:
 * issue 16). One JSON object per SA and line, for the guest suites:
 *
 *   sa_thresholds            (run it with `ip netns exec NS`)
 *
 * {"src":"10.1.0.1","dst":"10.1.0.2","spi":"0xc1234567","proto":50,
 *  "reqid":11,"mark":"0x0/0x0","add_time":1700000000,
 *  "raw_replay":32,"raw_etimer_100ms":20,"lib_replay":32,"lib_timer_ms":2000}
 *
 * A field the kernel did not answer is null. Exit 0 if every SA could be
 * read both ways, 1 otherwise.
 *
 *   sa_thresholds --expect REQID:REPLAY:TIMER_MS[:COUNT]...
 *
 * prints nothing but what is wrong, and exits 1 if anything is: every SA of
 * each REQID must have these thresholds in the raw answer (the timer in
 * 100 ms units) and in the library's; with COUNT, there must be exactly
 * COUNT such SAs.
 *
 *   sa_thresholds --spis REQID [ADDR]
 *
 * prints the SPIs of REQID's SAs (those with ADDR as source or
 * destination), sorted, on one line. The guest suites poll with these two
 * (no Python in their loops: under TCG its start costs seconds). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/xfrm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <xfrmsync.h>

#define MAX_SAS 1024

struct sa {
	struct xfrm_usersa_info info;
	struct xfrm_mark mark;
};

static int nl_open(void)
{
	struct sockaddr_nl local = { .nl_family = AF_NETLINK };
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_XFRM);

	if (fd < 0 || bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0) {
		perror("sa_thresholds: netlink socket");
		exit(1);
	}
	return fd;
}

static void addr_str(int family, const xfrm_address_t *a, char *buf, size_t len)
{
	if (!inet_ntop(family, a, buf, len))
		snprintf(buf, len, "?");
}

/* GETSA dump into sas; returns the count. */
static int dump_sas(int fd, struct sa *sas, int max)
{
	struct nlmsghdr req = {
		.nlmsg_len = NLMSG_LENGTH(0),
		.nlmsg_type = XFRM_MSG_GETSA,
		.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP,
		.nlmsg_seq = 1,
	};
	static char buf[65536];
	int n = 0;

	if (send(fd, &req, req.nlmsg_len, 0) < 0) {
		perror("sa_thresholds: GETSA dump");
		exit(1);
	}
	for (;;) {
		ssize_t got = recv(fd, buf, sizeof(buf), 0);
		struct nlmsghdr *h;

		if (got < 0) {
			perror("sa_thresholds: recv");
			exit(1);
		}
		for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)got); h = NLMSG_NEXT(h, got)) {
			struct xfrm_usersa_info *info;
			struct rtattr *rta;
			int alen;

			if (h->nlmsg_type == NLMSG_DONE)
				return n;
			if (h->nlmsg_type == NLMSG_ERROR) {
				fprintf(stderr, "sa_thresholds: GETSA dump: error %d\n",
					((struct nlmsgerr *)NLMSG_DATA(h))->error);
				exit(1);
			}
			if (h->nlmsg_type != XFRM_MSG_NEWSA || n >= max)
				continue;
			info = NLMSG_DATA(h);
			memset(&sas[n], 0, sizeof(sas[n]));
			sas[n].info = *info;
			rta = (struct rtattr *)((char *)info + NLMSG_ALIGN(sizeof(*info)));
			alen = h->nlmsg_len - NLMSG_LENGTH(sizeof(*info));
			for (; RTA_OK(rta, alen); rta = RTA_NEXT(rta, alen))
				if (rta->rta_type == XFRMA_MARK && RTA_PAYLOAD(rta) >= sizeof(struct xfrm_mark))
					memcpy(&sas[n].mark, RTA_DATA(rta), sizeof(struct xfrm_mark));
			n++;
		}
	}
}

/* One raw GETAE with threshold flags `flags`; each threshold the answer
 * carries is stored, the others are left alone. */
static int raw_getae_flags(int fd, const struct sa *sa, uint32_t flags, long *replay, long *etimer)
{
	struct {
		struct nlmsghdr h;
		struct xfrm_aevent_id ae;
		char attrs[64];
	} req;
	static char buf[8192];
	static unsigned seq = 100;
	struct rtattr *rta;
	ssize_t got;

	memset(&req, 0, sizeof(req));
	req.h.nlmsg_len = NLMSG_LENGTH(sizeof(req.ae));
	req.h.nlmsg_type = XFRM_MSG_GETAE;
	req.h.nlmsg_flags = NLM_F_REQUEST;
	req.h.nlmsg_seq = ++seq;
	req.ae.sa_id.daddr = sa->info.id.daddr;
	req.ae.sa_id.spi = sa->info.id.spi;
	req.ae.sa_id.family = sa->info.family;
	req.ae.sa_id.proto = sa->info.id.proto;
	req.ae.saddr = sa->info.saddr;
	req.ae.reqid = sa->info.reqid;
	req.ae.flags = flags;
	if (sa->mark.v || sa->mark.m) {
		rta = (struct rtattr *)((char *)&req + NLMSG_ALIGN(req.h.nlmsg_len));
		rta->rta_type = XFRMA_MARK;
		rta->rta_len = RTA_LENGTH(sizeof(struct xfrm_mark));
		memcpy(RTA_DATA(rta), &sa->mark, sizeof(struct xfrm_mark));
		req.h.nlmsg_len = NLMSG_ALIGN(req.h.nlmsg_len) + RTA_ALIGN(rta->rta_len);
	}
	if (send(fd, &req, req.h.nlmsg_len, 0) < 0)
		return -errno;
	for (;;) {
		struct nlmsghdr *h;
		int alen;

		got = recv(fd, buf, sizeof(buf), 0);
		if (got < 0)
			return -errno;
		h = (struct nlmsghdr *)buf;
		if (!NLMSG_OK(h, (size_t)got) || h->nlmsg_seq != seq)
			continue;
		if (h->nlmsg_type == NLMSG_ERROR)
			return ((struct nlmsgerr *)NLMSG_DATA(h))->error;
		if (h->nlmsg_type != XFRM_MSG_NEWAE)
			return -EPROTO;
		rta = (struct rtattr *)((char *)NLMSG_DATA(h) + NLMSG_ALIGN(sizeof(struct xfrm_aevent_id)));
		alen = h->nlmsg_len - NLMSG_LENGTH(sizeof(struct xfrm_aevent_id));
		for (; RTA_OK(rta, alen); rta = RTA_NEXT(rta, alen)) {
			if (RTA_PAYLOAD(rta) < 4)
				continue;
			if (rta->rta_type == XFRMA_REPLAY_THRESH)
				*replay = *(uint32_t *)RTA_DATA(rta);
			else if (rta->rta_type == XFRMA_ETIMER_THRESH)
				*etimer = *(uint32_t *)RTA_DATA(rta);
		}
		return 0;
	}
}

/* Raw GETAE of both thresholds; -1 where not answered. A marked SA is
 * asked one threshold per request (XFRM_AE_RTHR, then XFRM_AE_ETHR):
 * Linux 5.10's xfrm_aevent_msgsize() leaves out XFRMA_IF_ID, so asking
 * for both at once about an SA with a mark and an if_id overflows the
 * answer and hits the BUG_ON in xfrm_get_ae (issue 16). An unmarked SA
 * is asked both in one request. */
static int raw_getae(int fd, const struct sa *sa, long *replay, long *etimer)
{
	int rc;

	*replay = *etimer = -1;
	if (!sa->mark.v && !sa->mark.m)
		return raw_getae_flags(fd, sa, XFRM_AE_RTHR | XFRM_AE_ETHR, replay, etimer);
	rc = raw_getae_flags(fd, sa, XFRM_AE_RTHR, replay, etimer);
	if (rc < 0)
		return rc;
	return raw_getae_flags(fd, sa, XFRM_AE_ETHR, replay, etimer);
}

static void json_num(const char *key, long v, int last)
{
	if (v < 0)
		printf("\"%s\":null%s", key, last ? "" : ",");
	else
		printf("\"%s\":%ld%s", key, v, last ? "" : ",");
}

struct expect {
	unsigned reqid, replay, timer_ms;
	int count; /* -1: any */
	int seen;
};

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	static struct sa sas[MAX_SAS];
	static struct expect expects[16];
	static uint32_t spis[MAX_SAS];
	xfrmsync_handle *h;
	int fd, n, i, bad = 0, n_expect = 0, n_spis = 0, mode_spis = 0;
	unsigned spis_reqid = 0;
	char spis_addr[INET6_ADDRSTRLEN] = "";

	if (argc > 1 && !strcmp(argv[1], "--expect")) {
		for (i = 2; i < argc && n_expect < 16; i++) {
			struct expect *e = &expects[n_expect++];

			e->count = -1;
			if (sscanf(argv[i], "%u:%u:%u:%d", &e->reqid, &e->replay, &e->timer_ms, &e->count) < 3) {
				fprintf(stderr, "sa_thresholds: bad expectation %s\n", argv[i]);
				return 2;
			}
		}
	} else if (argc > 2 && !strcmp(argv[1], "--spis")) {
		mode_spis = 1;
		spis_reqid = strtoul(argv[2], NULL, 0);
		if (argc > 3)
			snprintf(spis_addr, sizeof(spis_addr), "%s", argv[3]);
	} else if (argc > 1) {
		fprintf(stderr, "usage: sa_thresholds [--expect REQID:REPLAY:TIMER_MS[:COUNT]... | --spis REQID [ADDR]]\n");
		return 2;
	}

	if (xfrmsync_handle_new(&h) < 0) {
		fprintf(stderr, "sa_thresholds: xfrmsync_handle_new: %s\n", xfrmsync_last_error());
		return 1;
	}
	fd = nl_open();
	n = dump_sas(fd, sas, MAX_SAS);
	for (i = 0; i < n; i++) {
		const struct sa *sa = &sas[i];
		char src[INET6_ADDRSTRLEN], dst[INET6_ADDRSTRLEN];
		long raw_replay, raw_etimer, lib_replay = -1, lib_timer = -1;
		xfrmsync_sa_id id;
		xfrmsync_aevent ev;
		int rc;

		if (!sa->info.id.spi)
			continue; /* larval (SPI allocation pending): no aevents */
		addr_str(sa->info.family, &sa->info.saddr, src, sizeof(src));
		addr_str(sa->info.family, &sa->info.id.daddr, dst, sizeof(dst));
		if (mode_spis) {
			if (sa->info.reqid == spis_reqid &&
			    (!spis_addr[0] || !strcmp(spis_addr, src) || !strcmp(spis_addr, dst)))
				spis[n_spis++] = ntohl(sa->info.id.spi);
			continue;
		}
		rc = raw_getae(fd, sa, &raw_replay, &raw_etimer);
		if (rc < 0) {
			fprintf(stderr, "sa_thresholds: raw GETAE of SPI 0x%08x: %s\n",
				ntohl(sa->info.id.spi), strerror(-rc));
			bad = 1;
		}
		memset(&id, 0, sizeof(id));
		memcpy(id.daddr, &sa->info.id.daddr, sizeof(id.daddr));
		id.spi = ntohl(sa->info.id.spi);
		id.family = sa->info.family;
		id.proto = sa->info.id.proto;
		id.mark_value = sa->mark.v;
		id.mark_mask = sa->mark.m;
		rc = xfrmsync_query(h, &id, XFRMSYNC_QUERY_THRESHOLDS, &ev);
		if (rc < 0) {
			fprintf(stderr, "sa_thresholds: xfrmsync_query of SPI 0x%08x: %s\n",
				id.spi, xfrmsync_last_error());
			bad = 1;
		} else {
			if (ev.present & XFRMSYNC_HAS_REPLAY_THRESHOLD)
				lib_replay = ev.replay_threshold;
			if (ev.present & XFRMSYNC_HAS_TIMER_THRESHOLD)
				lib_timer = ev.timer_threshold_ms;
		}
		if (n_expect) {
			int k;

			for (k = 0; k < n_expect; k++) {
				struct expect *e = &expects[k];

				if (e->reqid != sa->info.reqid)
					continue;
				e->seen++;
				if (raw_replay != (long)e->replay || raw_etimer != (long)(e->timer_ms / 100) ||
				    lib_replay != (long)e->replay || lib_timer != (long)e->timer_ms) {
					printf("reqid %u SA 0x%08x %s->%s: raw %ld packets/%ldx100 ms, library %ld packets/%ld ms; "
					       "want %u/%u ms\n", e->reqid, ntohl(sa->info.id.spi), src, dst, raw_replay,
					       raw_etimer, lib_replay, lib_timer, e->replay, e->timer_ms);
					bad = 1;
				}
			}
			continue;
		}
		printf("{\"src\":\"%s\",\"dst\":\"%s\",\"spi\":\"0x%08x\",\"proto\":%u,\"reqid\":%u,"
		       "\"mark\":\"0x%x/0x%x\",\"add_time\":%llu,",
		       src, dst, ntohl(sa->info.id.spi), sa->info.id.proto, sa->info.reqid,
		       sa->mark.v, sa->mark.m, (unsigned long long)sa->info.curlft.add_time);
		json_num("raw_replay", raw_replay, 0);
		json_num("raw_etimer_100ms", raw_etimer, 0);
		json_num("lib_replay", lib_replay, 0);
		json_num("lib_timer_ms", lib_timer, 1);
		printf("}\n");
	}
	if (mode_spis) {
		qsort(spis, n_spis, sizeof(spis[0]), cmp_u32);
		for (i = 0; i < n_spis; i++)
			printf("%s0x%08x", i ? " " : "", spis[i]);
		printf("\n");
	}
	for (i = 0; i < n_expect; i++) {
		if (expects[i].count >= 0 && expects[i].seen != expects[i].count) {
			printf("reqid %u: %d SAs, expected %d\n", expects[i].reqid, expects[i].seen, expects[i].count);
			bad = 1;
		} else if (!expects[i].seen) {
			printf("reqid %u: no SA\n", expects[i].reqid);
			bad = 1;
		}
	}
	xfrmsync_handle_free(h);
	close(fd);
	return bad;
}

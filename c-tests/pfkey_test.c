/* racoon's path: SAs installed through PF_KEY (module af_key) get the
 * thresholds of the rules a separate applier process keeps (`xfrmsync
 * apply`, or c-tests/rule_apply.c on the C API). The kernel announces an SA
 * added with SADB_ADD, or completed with SADB_GETSPI + SADB_UPDATE as racoon
 * does for inbound SAs, on netlink like any other (pfkey_add calls
 * km_state_notify), and the applier's registry gives it its thresholds.
 *
 * Run it in a network namespace of its own while, in the same namespace,
 *
 *   rule_apply 'racoon-reqid:reqid=71,replay=16,timer=1500' \
 *              'racoon-peers:dst=10.20.9.0/24,replay=8,timer=700'
 *
 * runs (and printed "ready"). Then:
 *
 *   pfkey_test
 *
 * SAs (ESP transport, AES-CBC + HMAC-SHA256, replay window 32):
 *   0x7100a001 10.20.0.1 -> 10.20.0.2  reqid 71  SADB_ADD     reqid rule: 16/1500
 *   0x7100a002 10.20.0.2 -> 10.20.0.1  reqid 71  SADB_ADD     reqid rule: 16/1500
 *   0x7100a003 10.20.0.1 -> 10.20.9.5  reqid 0   SADB_ADD     address rule: 8/700
 *   0x7100a004 10.20.0.2 -> 10.20.9.6  reqid 71  GETSPI+UPDATE both match; the
 *                                                reqid rule is more specific: 16/1500
 *   0x7100a005 10.20.0.1 -> 10.30.0.2  reqid 99  SADB_ADD     no rule: 0/0
 * PF_KEY gives an SA no thresholds at all (af_key does not copy the
 * namespace's net.core.xfrm_aevent_* defaults, XFRM netlink does): without
 * a rule, racoon's SAs send no aevents. Each SA is polled right after the
 * kernel answered its ADD/UPDATE, every millisecond, and the time until its
 * thresholds show is printed. Then the SAD is flushed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/ipsec.h>
#include <linux/pfkeyv2.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

struct pfk_sa {
	uint32_t spi;
	const char *src, *dst;
	uint32_t reqid;
	int getspi; /* racoon's inbound way: GETSPI, then UPDATE */
	uint32_t want_replay, want_timer_ms; /* 0/0: no rule, nothing set */
	double added; /* CLOCK_MONOTONIC of the kernel's answer */
};

static struct pfk_sa sas[] = {
	{ 0x7100a001, "10.20.0.1", "10.20.0.2", 71, 0, 16, 1500, 0 },
	{ 0x7100a002, "10.20.0.2", "10.20.0.1", 71, 0, 16, 1500, 0 },
	{ 0x7100a003, "10.20.0.1", "10.20.9.5", 0, 0, 8, 700, 0 },
	{ 0x7100a004, "10.20.0.2", "10.20.9.6", 71, 1, 16, 1500, 0 },
	{ 0x7100a005, "10.20.0.1", "10.30.0.2", 99, 0, 0, 0, 0 }, /* none: 0/0 */
};
#define N_SAS (sizeof(sas) / sizeof(sas[0]))

static int pfk;
static uint32_t seq;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A PF_KEY message under construction, in 8-byte units. */
struct msg {
	uint64_t buf[128];
	size_t len; /* bytes */
};

static void *ext(struct msg *m, size_t bytes)
{
	void *p = (char *)m->buf + m->len;

	bytes = (bytes + 7) & ~(size_t)7;
	memset(p, 0, bytes);
	m->len += bytes;
	return p;
}

static void msg_start(struct msg *m, uint8_t type)
{
	struct sadb_msg *h;

	m->len = 0;
	h = ext(m, sizeof(*h));
	h->sadb_msg_version = PF_KEY_V2;
	h->sadb_msg_type = type;
	h->sadb_msg_satype = SADB_SATYPE_ESP;
	h->sadb_msg_seq = ++seq;
	h->sadb_msg_pid = getpid();
}

static void add_address(struct msg *m, uint16_t type, const char *addr)
{
	struct sadb_address *a = ext(m, sizeof(*a) + sizeof(struct sockaddr_in));
	struct sockaddr_in *sin = (struct sockaddr_in *)(a + 1);

	a->sadb_address_len = (sizeof(*a) + sizeof(*sin)) / 8;
	a->sadb_address_exttype = type;
	a->sadb_address_proto = IPSEC_PROTO_ANY;
	a->sadb_address_prefixlen = 32;
	sin->sin_family = AF_INET;
	inet_pton(AF_INET, addr, &sin->sin_addr);
}

static void add_sa2(struct msg *m, uint32_t reqid)
{
	struct sadb_x_sa2 *s = ext(m, sizeof(*s));

	s->sadb_x_sa2_len = sizeof(*s) / 8;
	s->sadb_x_sa2_exttype = SADB_X_EXT_SA2;
	s->sadb_x_sa2_mode = IPSEC_MODE_TRANSPORT;
	s->sadb_x_sa2_reqid = reqid;
}

static void add_key(struct msg *m, uint16_t type, uint8_t fill, unsigned bits)
{
	struct sadb_key *k = ext(m, sizeof(*k) + bits / 8);

	k->sadb_key_len = (sizeof(*k) + bits / 8 + 7) / 8;
	k->sadb_key_exttype = type;
	k->sadb_key_bits = bits;
	memset(k + 1, fill, bits / 8);
}

static void add_sa_ext(struct msg *m, uint32_t spi)
{
	struct sadb_sa *s = ext(m, sizeof(*s));

	s->sadb_sa_len = sizeof(*s) / 8;
	s->sadb_sa_exttype = SADB_EXT_SA;
	s->sadb_sa_spi = htonl(spi);
	s->sadb_sa_replay = 32;
	s->sadb_sa_state = SADB_SASTATE_MATURE;
	s->sadb_sa_auth = SADB_X_AALG_SHA2_256HMAC;
	s->sadb_sa_encrypt = SADB_X_EALG_AESCBC;
}

/* Sends m and waits for the kernel's answer to it; returns its errno
 * (0: success, negative: the kernel's), answer in *reply. */
static int transact(struct msg *m, struct msg *reply)
{
	struct sadb_msg *h = (struct sadb_msg *)m->buf;
	double deadline = now() + 30;

	h->sadb_msg_len = m->len / 8;
	if (send(pfk, m->buf, m->len, 0) < 0)
		return -errno;
	while (now() < deadline) {
		ssize_t got = recv(pfk, reply->buf, sizeof(reply->buf), 0);
		struct sadb_msg *r = (struct sadb_msg *)reply->buf;

		if (got < 0)
			return -errno;
		if ((size_t)got < sizeof(*r) || r->sadb_msg_seq != h->sadb_msg_seq ||
		    r->sadb_msg_pid != h->sadb_msg_pid || r->sadb_msg_type != h->sadb_msg_type)
			continue; /* somebody else's, or a broadcast */
		reply->len = got;
		return -(int)r->sadb_msg_errno;
	}
	return -ETIMEDOUT;
}

static int install(struct pfk_sa *sa)
{
	struct msg m, reply;
	int rc;

	if (sa->getspi) {
		struct sadb_spirange *r;

		msg_start(&m, SADB_GETSPI);
		add_sa2(&m, sa->reqid);
		add_address(&m, SADB_EXT_ADDRESS_SRC, sa->src);
		add_address(&m, SADB_EXT_ADDRESS_DST, sa->dst);
		r = ext(&m, sizeof(*r));
		r->sadb_spirange_len = sizeof(*r) / 8;
		r->sadb_spirange_exttype = SADB_EXT_SPIRANGE;
		r->sadb_spirange_min = sa->spi;
		r->sadb_spirange_max = sa->spi;
		rc = transact(&m, &reply);
		check(rc == 0, "SADB_GETSPI 0x%08x reqid %u: %s", sa->spi, sa->reqid, strerror(-rc));
		if (rc)
			return rc;
	}
	msg_start(&m, sa->getspi ? SADB_UPDATE : SADB_ADD);
	add_sa_ext(&m, sa->spi);
	add_sa2(&m, sa->reqid);
	add_address(&m, SADB_EXT_ADDRESS_SRC, sa->src);
	add_address(&m, SADB_EXT_ADDRESS_DST, sa->dst);
	add_key(&m, SADB_EXT_KEY_AUTH, 0x11, 256);
	add_key(&m, SADB_EXT_KEY_ENCRYPT, 0x22, 128);
	rc = transact(&m, &reply);
	sa->added = now();
	check(rc == 0, "%s 0x%08x %s -> %s reqid %u: %s", sa->getspi ? "SADB_UPDATE" : "SADB_ADD", sa->spi,
	      sa->src, sa->dst, sa->reqid, strerror(-rc));
	return rc;
}

static xfrmsync_sa_id id_of(const struct pfk_sa *sa)
{
	xfrmsync_sa_id id;

	memset(&id, 0, sizeof(id));
	inet_pton(AF_INET, sa->dst, id.daddr);
	id.spi = sa->spi;
	id.family = AF_INET;
	id.proto = IPPROTO_ESP;
	return id;
}

/* Polls the SA until it has its thresholds, at most 5 s; the time from
 * the kernel's PF_KEY answer in *waited (negative: never). */
static int wait_thresholds(xfrmsync_handle *h, const struct pfk_sa *sa, double *waited)
{
	xfrmsync_sa_id id = id_of(sa);
	double deadline = sa->added + 5;
	xfrmsync_aevent ev;

	*waited = -1;
	do {
		if (xfrmsync_query(h, &id, XFRMSYNC_QUERY_THRESHOLDS, &ev) == 0 &&
		    ev.replay_threshold == sa->want_replay && ev.timer_threshold_ms == sa->want_timer_ms) {
			*waited = now() - sa->added;
			return 1;
		}
		usleep(1000);
	} while (now() < deadline);
	return 0;
}

int main(void)
{
	xfrmsync_handle *h;
	xfrmsync_netns_defaults defaults;
	double waited[N_SAS];
	size_t i;
	struct msg m, reply;

	setvbuf(stdout, NULL, _IOLBF, 0);
	pfk = socket(PF_KEY, SOCK_RAW | SOCK_CLOEXEC, PF_KEY_V2);
	if (!check(pfk >= 0, "PF_KEY socket (module af_key): %s", strerror(errno)))
		return check_report("pfkey");
	{
		/* The first SA of a boot instantiates its algorithms: seconds
		 * under TCG. */
		struct timeval tv = { .tv_sec = 30 };

		setsockopt(pfk, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	}
	if (!check(xfrmsync_handle_new(&h) == 0, "xfrmsync handle"))
		return check_report("pfkey");
	if (xfrmsync_netns_defaults_read(NULL, &defaults) == 0)
		printf("# namespace defaults (for SAs added through XFRM netlink): %u packets, %u ms\n",
		       defaults.replay_packets, defaults.timer_ms);
	for (i = 0; i < N_SAS; i++) {
		waited[i] = -1;
		if (install(&sas[i]) == 0 && sas[i].want_replay)
			wait_thresholds(h, &sas[i], &waited[i]);
	}
	/* Give the applier time to (wrongly) touch the SA without a rule. */
	usleep(300000);
	for (i = 0; i < N_SAS; i++) {
		xfrmsync_sa_id id = id_of(&sas[i]);
		xfrmsync_aevent ev;
		int rc = xfrmsync_query(h, &id, XFRMSYNC_QUERY_THRESHOLDS, &ev);
		int ok = rc == 0 && (ev.present & XFRMSYNC_HAS_REPLAY_THRESHOLD) &&
			 (ev.present & XFRMSYNC_HAS_TIMER_THRESHOLD) && ev.replay_threshold == sas[i].want_replay &&
			 ev.timer_threshold_ms == sas[i].want_timer_ms;

		if (!sas[i].want_replay)
			check(ok, "SA 0x%08x (no rule) has %u packets, %u ms: PF_KEY gives an SA no thresholds "
			      "(no aevents at all), unlike XFRM netlink, which copies the namespace defaults",
			      sas[i].spi, rc ? 0 : ev.replay_threshold, rc ? 0 : ev.timer_threshold_ms);
		else
			check(ok, "SA 0x%08x (%s) has %u packets, %u ms (want %u, %u), %.1f ms after the kernel's answer",
			      sas[i].spi, sas[i].getspi ? "GETSPI+UPDATE" : "ADD", rc ? 0 : ev.replay_threshold,
			      rc ? 0 : ev.timer_threshold_ms, sas[i].want_replay, sas[i].want_timer_ms,
			      waited[i] * 1000);
	}

	msg_start(&m, SADB_FLUSH);
	((struct sadb_msg *)m.buf)->sadb_msg_satype = SADB_SATYPE_UNSPEC;
	check(transact(&m, &reply) == 0, "SADB_FLUSH");
	xfrmsync_handle_free(h);
	close(pfk);
	return check_report("pfkey");
}

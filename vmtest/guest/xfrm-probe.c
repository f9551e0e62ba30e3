/*
 * xfrm-probe: raw XFRM netlink for the VM rig (vmtest/), without libxfrmsync.
 * It installs SAs with a direction (XFRMA_SA_DIR, Linux 6.10+), which the
 * host's iproute2 (6.1) cannot, and observes what the running kernel does
 * with messages the library never sends. Runs inside the guest.
 *
 *   xfrm-probe [--netns NS] add-sa SRC DST SPI REQID in|out|none REPLAY
 *       Adds an ESP transport-mode SA (hmac(sha256)/128, cbc(aes), the keys
 *       of net-setup.sh). REPLAY is legacy:WINDOW or esn:WINDOW:BMP_LEN.
 *       Silent on success; on a refusal prints the errno and the kernel's
 *       extended-ack text on stderr and exits 1.
 *   xfrm-probe [--netns NS] sa-dir DST SPI
 *       Prints the direction the kernel reports for the SA (GETSA): in, out
 *       or none.
 *   xfrm-probe facts HZ
 *       In netns b of net-setup.sh: the size of struct xfrm_aevent_id as the
 *       kernel sends it, the units of XFRMA_ETIMER_THRESH, and the errno and
 *       extended-ack text of each failure a NEWAE/GETAE can provoke.
 *   xfrm-probe dir-facts UDP_SEND
 *       In netns a and b: what GETSA, GETAE and events say about the SAs
 *       net-setup.sh installed with XFRMA_SA_DIR (SPIs 0x8001 and 0x8101).
 *
 * facts and dir-facts print "ok - ..." / "not ok - ..." per check, then
 * "fact: KEY: VALUE" lines (collected by vmtest/guest/kernel-suite.sh into
 * target/vmtest/facts-<kernel>.txt), then "N passed, N failed". What they
 * expect depends on the running kernel's version: extended-ack texts for
 * NEWAE since 6.2, SA direction since 6.10.
 *
 * Build: see build_guest_tools in vmtest/lib.sh (cc -O2 -Wall -Werror).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/netlink.h>
#include <linux/xfrm.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

/* Linux 6.10 (include/uapi/linux/xfrm.h): the attribute after
 * XFRMA_MTIMER_THRESH, a __u8 with these values. Debian 12's headers (6.1)
 * do not have it yet. */
#define PROBE_XFRMA_SA_DIR 33
#define PROBE_SA_DIR_IN 1
#define PROBE_SA_DIR_OUT 2
_Static_assert(XFRMA_MTIMER_THRESH + 1 == PROBE_XFRMA_SA_DIR, "XFRMA_SA_DIR follows XFRMA_MTIMER_THRESH");

#ifndef NLM_F_CAPPED
#define NLM_F_CAPPED 0x100
#endif
#ifndef NLM_F_ACK_TLVS
#define NLM_F_ACK_TLVS 0x200
#endif
#ifndef NETLINK_EXT_ACK
#define NETLINK_EXT_ACK 11
#endif

static const char *prog = "xfrm-probe";
static int kernel_major, kernel_minor;
static int passed, failed;

static const char auth_key[32] = "\x01\x23\x45\x67\x89\xab\xcd\xef\x01\x23\x45\x67\x89\xab\xcd\xef"
				 "\x01\x23\x45\x67\x89\xab\xcd\xef\x01\x23\x45\x67\x89\xab\xcd\xef";
static const char enc_key[16] = "\x01\x23\x45\x67\x89\xab\xcd\xef\x01\x23\x45\x67\x89\xab\xcd\xef";

static void die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

__attribute__((format(printf, 2, 3))) static int check(int ok, const char *fmt, ...)
{
	va_list ap;

	printf("%s - ", ok ? "ok" : "not ok");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	if (ok)
		passed++;
	else
		failed++;
	return ok;
}

__attribute__((format(printf, 2, 3))) static void fact(const char *key, const char *fmt, ...)
{
	va_list ap;

	printf("fact: %s: ", key);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

static int kernel_at_least(int major, int minor)
{
	return kernel_major > major || (kernel_major == major && kernel_minor >= minor);
}

static void enter_netns(const char *arg)
{
	char path[PATH_MAX];
	int fd;

	if (strchr(arg, '/') != NULL)
		snprintf(path, sizeof(path), "%s", arg);
	else
		snprintf(path, sizeof(path), "/run/netns/%s", arg);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("open %s: %s", path, strerror(errno));
	if (setns(fd, CLONE_NEWNET) < 0)
		die("setns %s: %s", path, strerror(errno));
	close(fd);
}

/* A NETLINK_XFRM socket in the current network namespace; `groups` is an
 * XFRMNLGRP_* to join, or 0. */
static int nl_open(unsigned int group)
{
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	int one = 1, fd;

	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_XFRM);
	if (fd < 0)
		die("socket(NETLINK_XFRM): %s", strerror(errno));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("bind: %s", strerror(errno));
	/* Without it the kernel sends no extended-ack text. */
	if (setsockopt(fd, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof(one)) < 0)
		die("NETLINK_EXT_ACK: %s", strerror(errno));
	if (group && setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof(group)) < 0)
		die("join group %u: %s", group, strerror(errno));
	return fd;
}

static int nl_open_in(const char *netns, unsigned int group)
{
	enter_netns(netns);
	return nl_open(group);
}

/* ------------------------------------------------------------ messages */

struct req {
	union {
		struct nlmsghdr h;
		unsigned char buf[4096];
	};
};

static void req_init(struct req *r, uint16_t type, uint16_t flags, const void *body, size_t len)
{
	static uint32_t seq = 1000;

	memset(r, 0, sizeof(*r));
	r->h.nlmsg_len = NLMSG_LENGTH(len);
	r->h.nlmsg_type = type;
	r->h.nlmsg_flags = NLM_F_REQUEST | flags;
	r->h.nlmsg_seq = ++seq;
	memcpy(NLMSG_DATA(&r->h), body, len);
}

static void req_attr(struct req *r, uint16_t type, const void *data, size_t len)
{
	struct nlattr *a = (struct nlattr *)(r->buf + NLMSG_ALIGN(r->h.nlmsg_len));

	if (NLMSG_ALIGN(r->h.nlmsg_len) + NLA_ALIGN(NLA_HDRLEN + len) > sizeof(r->buf))
		die("request too long");
	a->nla_type = type;
	a->nla_len = NLA_HDRLEN + len;
	memcpy((unsigned char *)a + NLA_HDRLEN, data, len);
	r->h.nlmsg_len = NLMSG_ALIGN(r->h.nlmsg_len) + NLA_ALIGN(a->nla_len);
}

struct result {
	int err;		  /* 0, or the positive errno of the kernel's answer */
	char text[512];		  /* its extended-ack text, "" if none */
	unsigned char ans[16384]; /* the answer to a GET request */
	size_t ans_len;		  /* its length, 0 if none */
};

/* The extended-ack message of an NLMSG_ERROR, if any. */
static void parse_ext_ack(const struct nlmsghdr *h, struct result *res)
{
	const struct nlmsgerr *e = NLMSG_DATA(h);
	size_t at, end = h->nlmsg_len;

	if (!(h->nlmsg_flags & NLM_F_ACK_TLVS))
		return;
	/* After the echoed request: its header only (success, or capped), or
	 * the whole request. */
	at = NLMSG_HDRLEN + sizeof(int) +
	     ((e->error == 0 || (h->nlmsg_flags & NLM_F_CAPPED)) ? NLMSG_HDRLEN : NLMSG_ALIGN(e->msg.nlmsg_len));
	while (at + NLA_HDRLEN <= end) {
		const struct nlattr *a = (const void *)((const unsigned char *)h + at);
		if (a->nla_len < NLA_HDRLEN || at + a->nla_len > end)
			return;
		if ((a->nla_type & NLA_TYPE_MASK) == NLMSGERR_ATTR_MSG) {
			size_t n = a->nla_len - NLA_HDRLEN;
			if (n >= sizeof(res->text))
				n = sizeof(res->text) - 1;
			memcpy(res->text, (const char *)a + NLA_HDRLEN, n);
			res->text[n] = '\0';
			return;
		}
		at += NLA_ALIGN(a->nla_len);
	}
}

/* Sends `r` and waits (5 s at most) for its answer: an NLMSG_ERROR, or a
 * message of another type when `r` is a GET without NLM_F_ACK. */
static void transact(int fd, struct req *r, struct result *res)
{
	static unsigned char buf[65536];
	struct pollfd p = { .fd = fd, .events = POLLIN };

	memset(res, 0, sizeof(*res));
	if (send(fd, r->buf, r->h.nlmsg_len, 0) < 0)
		die("send: %s", strerror(errno));
	for (;;) {
		ssize_t n;

		if (poll(&p, 1, 5000) <= 0)
			die("no answer from the kernel to message type %u", r->h.nlmsg_type);
		n = recv(fd, buf, sizeof(buf), 0);
		if (n < 0)
			die("recv: %s", strerror(errno));
		for (struct nlmsghdr *h = (void *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_seq != r->h.nlmsg_seq)
				continue;
			if (h->nlmsg_type == NLMSG_ERROR) {
				const struct nlmsgerr *e = NLMSG_DATA(h);
				res->err = -e->error;
				parse_ext_ack(h, res);
				return;
			}
			if (h->nlmsg_len <= sizeof(res->ans)) {
				memcpy(res->ans, h, h->nlmsg_len);
				res->ans_len = h->nlmsg_len;
			}
			if (!(r->h.nlmsg_flags & NLM_F_ACK))
				return;
		}
	}
}

/* "accepted", or "-ERRNO (no text)" / "-ERRNO \"text\"". */
static const char *outcome(const struct result *res)
{
	static char s[640];

	if (res->err == 0)
		return "accepted";
	if (res->text[0])
		snprintf(s, sizeof(s), "-%s \"%s\"", strerrorname_np(res->err) ?: "E?", res->text);
	else
		snprintf(s, sizeof(s), "-%s (no text)", strerrorname_np(res->err) ?: "E?");
	return s;
}

/* Attributes of a message, starting `hdr` bytes into its payload. */
static const struct nlattr *find_attr(const struct nlmsghdr *h, size_t hdr, uint16_t type)
{
	size_t at = NLMSG_HDRLEN + NLMSG_ALIGN(hdr);

	while (at + NLA_HDRLEN <= h->nlmsg_len) {
		const struct nlattr *a = (const void *)((const unsigned char *)h + at);
		if (a->nla_len < NLA_HDRLEN || at + a->nla_len > h->nlmsg_len)
			return NULL;
		if ((a->nla_type & NLA_TYPE_MASK) == type)
			return a;
		at += NLA_ALIGN(a->nla_len);
	}
	return NULL;
}

static uint32_t attr_u32(const struct nlattr *a)
{
	uint32_t v;

	memcpy(&v, (const unsigned char *)a + NLA_HDRLEN, sizeof(v));
	return v;
}

/* XFRMA_SA_DIR of a message: 0 when it has none. */
static int sa_dir_of(const struct nlmsghdr *h, size_t hdr)
{
	const struct nlattr *a = find_attr(h, hdr, PROBE_XFRMA_SA_DIR);

	return a && a->nla_len >= NLA_HDRLEN + 1 ? *((const unsigned char *)a + NLA_HDRLEN) : 0;
}

static const char *dir_name(int dir)
{
	return dir == PROBE_SA_DIR_IN ? "in" : dir == PROBE_SA_DIR_OUT ? "out" : dir ? "?" : "none";
}

static int parse_addr(const char *s, xfrm_address_t *a)
{
	memset(a, 0, sizeof(*a));
	if (inet_pton(AF_INET, s, a) == 1)
		return AF_INET;
	if (inet_pton(AF_INET6, s, a) == 1)
		return AF_INET6;
	die("bad address '%s'", s);
	return 0;
}

static struct xfrm_usersa_id usersa_id(const char *dst, uint32_t spi)
{
	struct xfrm_usersa_id id;

	memset(&id, 0, sizeof(id));
	id.family = parse_addr(dst, &id.daddr);
	id.spi = htonl(spi);
	id.proto = IPPROTO_ESP;
	return id;
}

/* ------------------------------------------------------------ requests */

static void getsa(int fd, const char *dst, uint32_t spi, struct result *res)
{
	struct xfrm_usersa_id id = usersa_id(dst, spi);
	struct req r;

	req_init(&r, XFRM_MSG_GETSA, 0, &id, sizeof(id));
	transact(fd, &r, res);
}

/* GETAE; `flags` XFRM_AE_RTHR | XFRM_AE_ETHR asks for the thresholds.
 * With `with_dir`, the request also carries XFRMA_SA_DIR. */
static void getae(int fd, const char *dst, uint32_t spi, uint32_t flags, int with_dir, struct result *res)
{
	struct xfrm_aevent_id ae;
	struct req r;
	uint8_t dir = PROBE_SA_DIR_IN;

	memset(&ae, 0, sizeof(ae));
	ae.sa_id = usersa_id(dst, spi);
	ae.flags = flags;
	req_init(&r, XFRM_MSG_GETAE, 0, &ae, sizeof(ae));
	if (with_dir)
		req_attr(&r, PROBE_XFRMA_SA_DIR, &dir, sizeof(dir));
	transact(fd, &r, res);
}

/* NEWAE with NLM_F_ACK and the given extra flags (NLM_F_REPLACE or 0);
 * the attributes are added by the caller through `r` before sending. */
static void newae_begin(struct req *r, const char *dst, uint32_t spi, uint16_t flags)
{
	struct xfrm_aevent_id ae;

	memset(&ae, 0, sizeof(ae));
	ae.sa_id = usersa_id(dst, spi);
	req_init(r, XFRM_MSG_NEWAE, NLM_F_ACK | flags, &ae, sizeof(ae));
}

static uint32_t etimer_100ms(int fd, const char *dst, uint32_t spi)
{
	struct result res;
	const struct nlattr *a;

	getae(fd, dst, spi, XFRM_AE_ETHR, 0, &res);
	if (res.err || !res.ans_len)
		die("GETAE %s/0x%x: %s", dst, spi, outcome(&res));
	a = find_attr((struct nlmsghdr *)res.ans, sizeof(struct xfrm_aevent_id), XFRMA_ETIMER_THRESH);
	if (!a)
		die("GETAE %s/0x%x: no XFRMA_ETIMER_THRESH in the answer", dst, spi);
	return attr_u32(a);
}

static void set_etimer(int fd, const char *dst, uint32_t spi, uint32_t jiffies, struct result *res)
{
	struct req r;

	newae_begin(&r, dst, spi, NLM_F_REPLACE);
	req_attr(&r, XFRMA_ETIMER_THRESH, &jiffies, sizeof(jiffies));
	transact(fd, &r, res);
}

/* ------------------------------------------------------------ add-sa */

static int add_sa(int argc, char **argv)
{
	struct xfrm_usersa_info info;
	struct {
		struct xfrm_algo_auth a;
		char key[32];
	} auth;
	struct {
		struct xfrm_algo a;
		char key[16];
	} enc;
	struct {
		struct xfrm_replay_state_esn esn;
		uint32_t bmp[128];
	} esn;
	unsigned window = 0, bmp_len = 0;
	int dir, is_esn;
	struct req r;
	struct result res;

	if (argc != 6)
		die("usage: add-sa SRC DST SPI REQID in|out|none legacy:WINDOW|esn:WINDOW:BMP_LEN");
	dir = !strcmp(argv[4], "in") ? PROBE_SA_DIR_IN : !strcmp(argv[4], "out") ? PROBE_SA_DIR_OUT : 0;
	if (!dir && strcmp(argv[4], "none"))
		die("bad direction '%s'", argv[4]);
	if (sscanf(argv[5], "legacy:%u", &window) == 1)
		is_esn = 0;
	else if (sscanf(argv[5], "esn:%u:%u", &window, &bmp_len) == 2 && bmp_len <= 128)
		is_esn = 1;
	else
		die("bad replay '%s' (legacy:WINDOW or esn:WINDOW:BMP_LEN)", argv[5]);

	memset(&info, 0, sizeof(info));
	info.family = parse_addr(argv[0], &info.saddr);
	if (parse_addr(argv[1], &info.id.daddr) != info.family)
		die("SRC and DST of different families");
	info.id.spi = htonl(strtoul(argv[2], NULL, 0));
	info.id.proto = IPPROTO_ESP;
	info.reqid = strtoul(argv[3], NULL, 0);
	info.mode = XFRM_MODE_TRANSPORT;
	info.lft.soft_byte_limit = info.lft.hard_byte_limit = XFRM_INF;
	info.lft.soft_packet_limit = info.lft.hard_packet_limit = XFRM_INF;
	if (is_esn)
		info.flags = XFRM_STATE_ESN; /* the window is in the ESN attribute */
	else
		info.replay_window = window;
	req_init(&r, XFRM_MSG_NEWSA, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &info, sizeof(info));

	memset(&auth, 0, sizeof(auth));
	strcpy(auth.a.alg_name, "hmac(sha256)");
	auth.a.alg_key_len = 256;
	auth.a.alg_trunc_len = 128;
	memcpy(auth.key, auth_key, sizeof(auth.key));
	req_attr(&r, XFRMA_ALG_AUTH_TRUNC, &auth, sizeof(auth));
	memset(&enc, 0, sizeof(enc));
	strcpy(enc.a.alg_name, "cbc(aes)");
	enc.a.alg_key_len = 128;
	memcpy(enc.key, enc_key, sizeof(enc.key));
	req_attr(&r, XFRMA_ALG_CRYPT, &enc, sizeof(enc));
	if (is_esn) {
		memset(&esn, 0, sizeof(esn));
		esn.esn.bmp_len = bmp_len;
		esn.esn.replay_window = window;
		req_attr(&r, XFRMA_REPLAY_ESN_VAL, &esn, sizeof(esn.esn) + 4 * bmp_len);
	}
	if (dir) {
		uint8_t d = dir;
		req_attr(&r, PROBE_XFRMA_SA_DIR, &d, sizeof(d));
	}
	transact(nl_open(0), &r, &res);
	if (res.err) {
		fprintf(stderr, "%s: add-sa %s -> %s spi %s dir %s %s: %s\n", prog, argv[0], argv[1], argv[2], argv[4],
			argv[5], outcome(&res));
		return 1;
	}
	return 0;
}

static int sa_dir_cmd(int argc, char **argv)
{
	struct result res;

	if (argc != 2)
		die("usage: sa-dir DST SPI");
	getsa(nl_open(0), argv[0], strtoul(argv[1], NULL, 0), &res);
	if (res.err || !res.ans_len)
		die("GETSA %s/%s: %s", argv[0], argv[1], outcome(&res));
	printf("%s\n", dir_name(sa_dir_of((struct nlmsghdr *)res.ans, sizeof(struct xfrm_usersa_info))));
	return 0;
}

/* ------------------------------------------------------------ facts */

static const char *attr_name(uint16_t type)
{
	static char s[16];

	switch (type) {
	case XFRMA_LTIME_VAL: return "LTIME_VAL";
	case XFRMA_REPLAY_VAL: return "REPLAY_VAL";
	case XFRMA_REPLAY_THRESH: return "REPLAY_THRESH";
	case XFRMA_ETIMER_THRESH: return "ETIMER_THRESH";
	case XFRMA_MARK: return "MARK";
	case XFRMA_REPLAY_ESN_VAL: return "REPLAY_ESN_VAL";
	case XFRMA_PAD: return "PAD";
	case XFRMA_IF_ID: return "IF_ID";
	case PROBE_XFRMA_SA_DIR: return "SA_DIR";
	}
	snprintf(s, sizeof(s), "%u", type);
	return s;
}

/* The payload offset at which the answer's attributes start, found from
 * the message alone: the first offset from which a replay attribute and its
 * followers fill the payload exactly. Also lists the attribute names. */
static size_t aevent_header_len(const struct nlmsghdr *h, char *names, size_t names_len)
{
	const unsigned char *p = NLMSG_DATA(h);
	size_t len = h->nlmsg_len - NLMSG_HDRLEN;

	for (size_t off = 4; off + NLA_HDRLEN <= len; off += 4) {
		const struct nlattr *first = (const void *)(p + off);
		size_t at = off;
		int good = first->nla_type == XFRMA_REPLAY_VAL || first->nla_type == XFRMA_REPLAY_ESN_VAL;

		names[0] = '\0';
		while (good && at < len) {
			const struct nlattr *a = (const void *)(p + at);
			if (at + NLA_HDRLEN > len || a->nla_len < NLA_HDRLEN || at + a->nla_len > len) {
				good = 0;
				break;
			}
			snprintf(names + strlen(names), names_len - strlen(names), "%s%s", names[0] ? " " : "",
				 attr_name(a->nla_type & NLA_TYPE_MASK));
			at += NLA_ALIGN(a->nla_len);
		}
		if (good && at == len)
			return off;
	}
	return 0;
}

static void aevent_size_and_units(int fd, unsigned hz)
{
	const char *dst = "10.9.0.2";
	const uint32_t spi = 0x1001, set = 1000000;
	struct result res;
	char names[256];
	size_t hdr = 0;
	uint32_t before, back;

	getae(fd, dst, spi, XFRM_AE_RTHR | XFRM_AE_ETHR, 0, &res);
	if (check(res.err == 0 && res.ans_len > 0, "GETAE on 0x1001 answered: %s", outcome(&res)))
		hdr = aevent_header_len((struct nlmsghdr *)res.ans, names, sizeof(names));
	check(hdr == NLMSG_ALIGN(sizeof(struct xfrm_aevent_id)),
	      "the kernel's xfrm_aevent_id is %zu bytes (the uapi header says %zu)", hdr,
	      sizeof(struct xfrm_aevent_id));
	fact("aevent_id_size", "%zu", hdr);
	fact("getae_attrs", "%s", hdr ? names : "?");

	/* Timer threshold: set in jiffies, read back in XFRM_AE_ETH_M units. */
	before = etimer_100ms(fd, dst, spi);
	set_etimer(fd, dst, spi, set, &res);
	check(res.err == 0, "NEWAE XFRMA_ETIMER_THRESH = %u jiffies: %s", set, outcome(&res));
	back = etimer_100ms(fd, dst, spi);
	set_etimer(fd, dst, spi, before * hz / 10, &res);
	check(res.err == 0 && etimer_100ms(fd, dst, spi) == before, "timer threshold restored to %u x 100 ms",
	      before);
	check(back == (uint64_t)set * 10 / hz, "%u jiffies read back as %u = jiffies * 10 / HZ (HZ %u)", set, back,
	      hz);
	fact("timer_units", "%.0f ms (%u jiffies read back as %u, HZ %u)", back ? set * 1000.0 / back / hz : 0.0, set,
	     back, hz);
}

struct failure {
	const char *key, *what;
	int expect_errno;
	int text_since_major, text_since_minor; /* 0: no expectation about the text */
};

static void record_failure(const struct failure *f, const struct result *res)
{
	int text_expected = f->text_since_major && kernel_at_least(f->text_since_major, f->text_since_minor);

	check(res->err == f->expect_errno, "%s: -%s expected, got %s", f->what, strerrorname_np(f->expect_errno),
	      outcome(res));
	if (f->text_since_major)
		check(!!res->text[0] == text_expected, "%s: extended-ack text %s since %d.%d: %s", f->what,
		      text_expected ? "expected" : "not expected before", f->text_since_major, f->text_since_minor,
		      res->text[0] ? res->text : "(none)");
	fact(f->key, "%s", outcome(res));
}

static void failures(int fd)
{
	const char *dst = "10.9.0.2";
	uint32_t thresh = 2;
	struct req r;
	struct result res;

	static const struct failure getae_unknown = { "extack.getae_unknown_sa", "GETAE on an unknown SA", ESRCH };
	getae(fd, dst, 0xdead, 0, 0, &res);
	record_failure(&getae_unknown, &res);

	static const struct failure newae_unknown = { "extack.newae_unknown_sa", "NEWAE on an unknown SA", ESRCH };
	newae_begin(&r, dst, 0xdead, NLM_F_REPLACE);
	req_attr(&r, XFRMA_REPLAY_THRESH, &thresh, sizeof(thresh));
	transact(fd, &r, &res);
	record_failure(&newae_unknown, &res);

	/* Linux 6.2 ("xfrm: add extack to xfrm_new_ae and
	 * xfrm_replay_verify_len") gave these three their texts. */
	static const struct failure no_replace = { "extack.newae_no_replace", "NEWAE without NLM_F_REPLACE", EINVAL,
						   6, 2 };
	newae_begin(&r, dst, 0x1001, 0);
	req_attr(&r, XFRMA_REPLAY_THRESH, &thresh, sizeof(thresh));
	transact(fd, &r, &res);
	record_failure(&no_replace, &res);

	static const struct failure no_attr = { "extack.newae_no_attribute", "NEWAE with no attribute", EINVAL, 6, 2 };
	newae_begin(&r, dst, 0x1001, NLM_F_REPLACE);
	transact(fd, &r, &res);
	record_failure(&no_attr, &res);

	/* SA 0x2001 is ESN with a 4-word bitmap; send 2 words. */
	static const struct failure bmp = { "extack.newae_esn_bmp_len", "ESN NEWAE with another bmp_len", EINVAL, 6,
					    2 };
	struct {
		struct xfrm_replay_state_esn esn;
		uint32_t bmp[2];
	} esn;
	memset(&esn, 0, sizeof(esn));
	esn.esn.bmp_len = 2;
	esn.esn.replay_window = 64;
	newae_begin(&r, dst, 0x2001, NLM_F_REPLACE);
	req_attr(&r, XFRMA_REPLAY_ESN_VAL, &esn, sizeof(esn));
	transact(fd, &r, &res);
	record_failure(&bmp, &res);

	/* Linux 6.10 ("xfrm: Restrict SA direction attribute to specific
	 * netlink message types") refuses XFRMA_SA_DIR outside NEWSA, UPDSA
	 * and ALLOCSPI; before, the attribute was above XFRMA_MAX and ignored. */
	getae(fd, dst, 0x1001, 0, 1, &res);
	if (kernel_at_least(6, 10))
		check(res.err == EINVAL && res.text[0], "GETAE carrying XFRMA_SA_DIR refused since 6.10: %s",
		      outcome(&res));
	else
		check(res.err == 0, "GETAE carrying XFRMA_SA_DIR: the attribute is ignored before 6.10: %s",
		      outcome(&res));
	fact("extack.getae_with_sa_dir", "%s", outcome(&res));
}

static int facts_cmd(int argc, char **argv)
{
	unsigned hz;

	if (argc != 1 || (hz = strtoul(argv[0], NULL, 0)) == 0)
		die("usage: facts HZ");
	int fd = nl_open_in("b", 0);
	aevent_size_and_units(fd, hz);
	failures(fd);
	printf("xfrm-probe facts: %d passed, %d failed\n", passed, failed);
	return failed || !passed;
}

/* ------------------------------------------------------------ dir-facts */

static const struct dir_sa {
	const char *ns;
	uint32_t spi;
	int dir;
	int port;
} dir_sas[] = {
	{ "a", 0x8001, PROBE_SA_DIR_OUT, 9009 },
	{ "a", 0x8101, PROBE_SA_DIR_OUT, 9010 },
	{ "b", 0x8001, PROBE_SA_DIR_IN, 9009 },
	{ "b", 0x8101, PROBE_SA_DIR_IN, 9010 },
};
#define N_DIR_SAS (sizeof(dir_sas) / sizeof(dir_sas[0]))

struct seen_events {
	int count, with_dir, dir_ok;
	uint32_t causes;
};

static void collect_events(int fd, const char *ns, struct seen_events *seen, int ms)
{
	static unsigned char buf[65536];
	struct pollfd p = { .fd = fd, .events = POLLIN };
	struct timespec t0, t;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		int left;
		ssize_t n;

		clock_gettime(CLOCK_MONOTONIC, &t);
		left = ms - (int)((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000);
		if (left <= 0 || poll(&p, 1, left) <= 0)
			return;
		n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n < 0)
			continue;
		for (struct nlmsghdr *h = (void *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			const struct xfrm_aevent_id *ae = NLMSG_DATA(h);
			if (h->nlmsg_type != XFRM_MSG_NEWAE || h->nlmsg_len < NLMSG_LENGTH(sizeof(*ae)))
				continue;
			for (size_t i = 0; i < N_DIR_SAS; i++) {
				int dir;
				if (strcmp(dir_sas[i].ns, ns) || ntohl(ae->sa_id.spi) != dir_sas[i].spi)
					continue;
				dir = sa_dir_of(h, sizeof(*ae));
				seen[i].count++;
				seen[i].with_dir += dir != 0;
				seen[i].dir_ok += dir == dir_sas[i].dir;
				seen[i].causes |= ae->flags & (XFRM_AE_CR | XFRM_AE_CE | XFRM_AE_CU);
			}
		}
	}
}

/* "out SAs X, in SAs Y" from one value per SA of dir_sas (-1: failed). */
static const char *per_side(const int got[N_DIR_SAS])
{
	static char s[128];
	int side[2] = { -2, -2 }; /* a (out), b (in); -3: the two SAs differ */

	for (size_t i = 0; i < N_DIR_SAS; i++) {
		int b = *dir_sas[i].ns == 'b';
		side[b] = side[b] == -2 ? got[i] : side[b] == got[i] ? side[b] : -3;
	}
	snprintf(s, sizeof(s), "out SAs %s, in SAs %s", side[0] == -3 ? "differ" : side[0] < 0 ? "failed" : dir_name(side[0]),
		 side[1] == -3 ? "differ" : side[1] < 0 ? "failed" : dir_name(side[1]));
	return s;
}

static int dir_facts_cmd(int argc, char **argv)
{
	const int kept = kernel_at_least(6, 10);
	int req[2], ev[2], getsa_dir[N_DIR_SAS], getae_dir[N_DIR_SAS], events = 0, with_dir = 0, dir_ok = 0;
	struct result res;
	struct seen_events seen[N_DIR_SAS];
	char cmd[PATH_MAX + 128];

	if (argc != 1)
		die("usage: dir-facts UDP_SEND");
	req[0] = nl_open_in("a", 0);
	ev[0] = nl_open(XFRMNLGRP_AEVENTS);
	req[1] = nl_open_in("b", 0);
	ev[1] = nl_open(XFRMNLGRP_AEVENTS);
	printf("# SAs installed with XFRMA_SA_DIR: out in netns a, in in netns b; this kernel %s it\n",
	       kept ? "keeps" : "ignores (before 6.10)");

	for (size_t i = 0; i < N_DIR_SAS; i++) {
		const struct dir_sa *s = &dir_sas[i];
		int fd = req[*s->ns == 'b'];
		const char *want = dir_name(kept ? s->dir : 0);

		getsa(fd, "10.9.0.2", s->spi, &res);
		getsa_dir[i] = res.err || !res.ans_len ? -1
						       : sa_dir_of((struct nlmsghdr *)res.ans, sizeof(struct xfrm_usersa_info));
		check(getsa_dir[i] == (kept ? s->dir : 0), "GETSA %s/0x%x (installed dir %s): reports dir %s (want %s)",
		      s->ns, s->spi, dir_name(s->dir), getsa_dir[i] < 0 ? outcome(&res) : dir_name(getsa_dir[i]), want);

		getae(fd, "10.9.0.2", s->spi, XFRM_AE_RTHR | XFRM_AE_ETHR, 0, &res);
		getae_dir[i] = res.err || !res.ans_len ? -1
						       : sa_dir_of((struct nlmsghdr *)res.ans, sizeof(struct xfrm_aevent_id));
		check(getae_dir[i] == (kept ? s->dir : 0), "GETAE %s/0x%x: %s, answer carries XFRMA_SA_DIR %s (want %s)",
		      s->ns, s->spi, outcome(&res), getae_dir[i] < 0 ? "-" : dir_name(getae_dir[i]), want);
	}

	/* Default thresholds (2 packets, 1 s): the traffic gives events on
	 * both sides. */
	memset(seen, 0, sizeof(seen));
	for (int port = 9009; port <= 9010; port++) {
		snprintf(cmd, sizeof(cmd), "%s --netns /run/netns/a 10.9.0.2 %d 6 32 20 2>/dev/null", argv[0], port);
		check(system(cmd) == 0, "sent 6 packets on port %d", port);
	}
	collect_events(ev[0], "a", seen, 1500);
	collect_events(ev[1], "b", seen, 300);
	for (size_t i = 0; i < N_DIR_SAS; i++) {
		const struct dir_sa *s = &dir_sas[i];
		check(seen[i].count > 0, "events of %s/0x%x (dir %s): %d (%s%s%s)", s->ns, s->spi, dir_name(s->dir),
		      seen[i].count, seen[i].causes & XFRM_AE_CR ? "replay " : "",
		      seen[i].causes & XFRM_AE_CE ? "timer " : "", seen[i].causes & XFRM_AE_CU ? "update" : "");
		if (kept)
			check(seen[i].dir_ok == seen[i].count, "%d of %d events of %s/0x%x carry XFRMA_SA_DIR %s",
			      seen[i].dir_ok, seen[i].count, s->ns, s->spi, dir_name(s->dir));
		else
			check(seen[i].with_dir == 0, "no event of %s/0x%x carries XFRMA_SA_DIR (%d do)", s->ns, s->spi,
			      seen[i].with_dir);
		events += seen[i].count;
		with_dir += seen[i].with_dir;
		dir_ok += seen[i].dir_ok;
	}
	fact("sa_dir.getsa", "%s", per_side(getsa_dir));
	fact("sa_dir.getae_attr", "%s", per_side(getae_dir));
	fact("sa_dir.event_attr", "%d of %d events carry XFRMA_SA_DIR%s", with_dir, events,
	     with_dir == 0 ? "" : dir_ok == events ? ", each its SA's" : ", not always their SA's");
	printf("xfrm-probe dir-facts: %d passed, %d failed\n", passed, failed);
	return failed || !passed;
}

int main(int argc, char **argv)
{
	struct utsname u;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (uname(&u) == 0)
		sscanf(u.release, "%d.%d", &kernel_major, &kernel_minor);
	argc--, argv++;
	if (argc >= 2 && !strcmp(argv[0], "--netns")) {
		enter_netns(argv[1]);
		argc -= 2, argv += 2;
	}
	if (argc < 1)
		die("usage: xfrm-probe [--netns NS] add-sa|sa-dir|facts|dir-facts ...");
	if (!strcmp(argv[0], "add-sa"))
		return add_sa(argc - 1, argv + 1);
	if (!strcmp(argv[0], "sa-dir"))
		return sa_dir_cmd(argc - 1, argv + 1);
	if (!strcmp(argv[0], "facts"))
		return facts_cmd(argc - 1, argv + 1);
	if (!strcmp(argv[0], "dir-facts"))
		return dir_facts_cmd(argc - 1, argv + 1);
	die("unknown command '%s'", argv[0]);
	return 2;
}

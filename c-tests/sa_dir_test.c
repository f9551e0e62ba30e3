/* Real-kernel checks of the C API on SAs installed with a direction
 * (XFRMA_SA_DIR, Linux 6.10+), run inside the test VM after
 * vmtest/guest/net-setup.sh: SPIs 0x8001 (legacy) and 0x8101 (ESN),
 * 10.9.0.1 -> 10.9.0.2, dir out in netns a and dir in in netns b. Kernels
 * before 6.10 ignore the direction; there they are ordinary SAs and the same
 * checks say so.
 *
 *   sa_dir_test UDP_SEND DIR EXPECTED_HZ
 *
 * DIR is the direction the kernel reports for the SA in b ("in", or "none"
 * when it ignored it; vmtest/guest/xfrm-probe sa-dir). Besides the checks it
 * prints "fact: KEY: VALUE" lines for the README's kernel-facts table
 * (vmtest/guest/kernel-suite.sh collects them). Operations that put a value
 * of the other direction on an SA (seq on an out SA, oseq on an in SA) are
 * recorded as the kernel answers them: accepted, or refused with its errno
 * and extended-ack text, which the library must pass on. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

static const char *udp_send;
static xfrmsync_handle *ha, *hb; /* namespaces a (dir out) and b (dir in) */
static const char *side_name[2] = { "out", "in" };

struct dir_sa {
	xfrmsync_handle **h;
	int in; /* 1: the receiving side's SA (dir in), 0: the sender's (dir out) */
	uint32_t spi;
	int esn, port;
	const char *name;
	/* filled in by the test */
	xfrmsync_aevent before;
	int events;
	uint64_t last_seq;
};

static struct dir_sa sas[] = {
	{ .h = &ha, .in = 0, .spi = 0x8001, .esn = 0, .port = 9009, .name = "out legacy 0x8001" },
	{ .h = &ha, .in = 0, .spi = 0x8101, .esn = 1, .port = 9010, .name = "out ESN 0x8101" },
	{ .h = &hb, .in = 1, .spi = 0x8001, .esn = 0, .port = 9009, .name = "in legacy 0x8001" },
	{ .h = &hb, .in = 1, .spi = 0x8101, .esn = 1, .port = 9010, .name = "in ESN 0x8101" },
};
#define N_SAS (sizeof(sas) / sizeof(sas[0]))

/* The sequence number an SA's side moves: seq where it receives, oseq where
 * it sends. */
static uint64_t side_seq(const struct dir_sa *s, const xfrmsync_replay *r)
{
	return s->in ? ((uint64_t)r->seq_hi << 32 | r->seq) : ((uint64_t)r->oseq_hi << 32 | r->oseq);
}

/* "accepted", or "-ERRNO: the library's message" for a failed call. */
static const char *outcome(int rc)
{
	static char s[640];

	if (rc == 0)
		return "accepted";
	snprintf(s, sizeof(s), "-%s: %s", strerrorname_np(-rc) ?: "E?", xfrmsync_last_error());
	return s;
}

/* A refusal the library reports cleanly: a negative errno and the kernel's
 * answer in the message. */
static int clean(int rc)
{
	return rc == 0 || (rc < 0 && strstr(xfrmsync_last_error(), "kernel") != NULL);
}

static void on_event(void *user_data, const xfrmsync_aevent *ev)
{
	struct dir_sa *s = user_data;

	s->events++;
	s->last_seq = side_seq(s, &ev->replay);
}

/* Dispatches on both handles for `ms` milliseconds. */
static int pump_both(int ms)
{
	double end = now_ms() + ms;
	struct pollfd p[2] = { { .fd = xfrmsync_handle_fd(ha), .events = POLLIN },
			       { .fd = xfrmsync_handle_fd(hb), .events = POLLIN } };

	for (;;) {
		double left = end - now_ms();
		if (left <= 0)
			return 0;
		if (poll(p, 2, (int)left + 1) > 0) {
			for (int i = 0; i < 2; i++) {
				int rc = (p[i].revents & POLLIN) ? xfrmsync_dispatch(i ? hb : ha) : 0;
				if (rc < 0)
					return rc;
			}
		}
	}
}

static char line[1024];
static void line_add(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void line_add(const char *fmt, ...)
{
	va_list ap;
	size_t n = strlen(line);

	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - n, fmt, ap);
	va_end(ap);
}

static void measure_hz(int expected_hz)
{
	xfrmsync_sa_id in = esp_sa("10.9.0.2", 0x8001);
	uint32_t hz = 0;
	int rc = xfrmsync_calibrate_hz(hb, &in, &hz);

	check(rc == 0, "HZ measured on the in SA 0x8001: %u (%s)", hz, outcome(rc));
	check(expected_hz <= 0 || hz == (uint32_t)expected_hz, "measured HZ %u equals CONFIG_HZ %d", hz, expected_hz);
	printf("fact: hz: %u\n", hz);
}

static void queries(int kept)
{
	line[0] = '\0';
	for (size_t i = 0; i < N_SAS; i++) {
		struct dir_sa *s = &sas[i];
		xfrmsync_sa_id id = esp_sa("10.9.0.2", s->spi);
		int rc = xfrmsync_query(*s->h, &id, XFRMSYNC_QUERY_THRESHOLDS, &s->before);

		check(rc == 0, "GETAE on the %s SA (%s): %s", s->name, kept ? "installed with its direction" : "direction ignored",
		      outcome(rc));
		if (rc == 0 && s->esn)
			check(s->before.replay.esn, "%s: ESN replay state, bmp_len %u, window %u", s->name,
			      s->before.replay.bmp_len, s->before.replay.replay_window);
		if (rc)
			line_add("%s%s: %s", line[0] ? "; " : "", s->name, outcome(rc));
	}
	printf("fact: sa_dir.getae: %s; ESN bmp_len: out %u, in %u\n", line[0] ? line : "accepted on all 4",
	       sas[1].before.replay.bmp_len, sas[3].before.replay.bmp_len);
}

static void thresholds(void)
{
	line[0] = '\0';
	for (size_t i = 0; i < N_SAS; i++) {
		struct dir_sa *s = &sas[i];
		xfrmsync_sa_id id = esp_sa("10.9.0.2", s->spi);
		xfrmsync_aevent ev;
		int rc = xfrmsync_set_thresholds(*s->h, &id, 4, 600);

		memset(&ev, 0, sizeof(ev));
		if (rc == 0)
			rc = xfrmsync_query(*s->h, &id, XFRMSYNC_QUERY_THRESHOLDS, &ev);
		check(rc == 0 && ev.replay_threshold == 4 && ev.timer_threshold_ms == 600,
		      "NEWAE thresholds on the %s SA: 4 packets, 600 ms read back as %u, %u ms (%s)", s->name,
		      ev.replay_threshold, ev.timer_threshold_ms, outcome(rc));
		if (rc)
			line_add("%s%s: %s", line[0] ? "; " : "", s->name, outcome(rc));
	}
	printf("fact: sa_dir.newae_thresholds: %s\n", line[0] ? line : "accepted on all 4");
}

static void events(void)
{
	const int n = 8;
	int rc;

	for (size_t i = 0; i < N_SAS; i++) {
		xfrmsync_sa_id id = esp_sa("10.9.0.2", sas[i].spi);
		check(xfrmsync_on_sa_event(*sas[i].h, &id, on_event, &sas[i]) == 0, "callback on the %s SA",
		      sas[i].name);
	}
	pump_both(100);
	for (size_t i = 0; i < N_SAS; i++)
		sas[i].events = 0;
	for (int port = 9009; port <= 9010; port++) {
		char cmd[512];
		snprintf(cmd, sizeof(cmd), "%s --netns /run/netns/a 10.9.0.2 %d %d 32 10 2>/dev/null", udp_send, port,
			 n);
		check(system(cmd) == 0, "sent %d packets on port %d", n, port);
	}
	rc = pump_both(2000);
	check(rc == 0, "dispatch on both handles (%s)", outcome(rc));
	line[0] = '\0';
	for (size_t i = 0; i < N_SAS; i++) {
		struct dir_sa *s = &sas[i];
		xfrmsync_sa_id id = esp_sa("10.9.0.2", s->spi);
		xfrmsync_aevent now;
		uint64_t start = side_seq(s, &s->before.replay);

		memset(&now, 0, sizeof(now));
		rc = xfrmsync_query(*s->h, &id, 0, &now);
		check(rc == 0 && side_seq(s, &now.replay) == start + n, "%s: %s moved from %" PRIu64 " to %" PRIu64,
		      s->name, s->in ? "seq" : "oseq", start, side_seq(s, &now.replay));
		check(s->events > 0 && s->last_seq > start && s->last_seq <= start + n,
		      "%s: %d events, the last at %s %" PRIu64, s->name, s->events, s->in ? "seq" : "oseq", s->last_seq);
		line_add("%s%d", i ? "/" : "", s->events);
		xfrmsync_on_sa_event(*s->h, &id, NULL, NULL);
		s->before = now;
	}
	/* Counts per SA: out legacy, out ESN, in legacy, in ESN. */
	printf("fact: sa_dir.events: %s\n", line);
}

/* Sets `replay` on one SA and reads it back. */
static int set_replay(struct dir_sa *s, const xfrmsync_replay *replay, const char *what, int must_work)
{
	xfrmsync_sa_id id = esp_sa("10.9.0.2", s->spi);
	xfrmsync_ae_update up;
	xfrmsync_aevent now;
	int rc;

	memset(&up, 0, sizeof(up));
	memset(&now, 0, sizeof(now));
	up.set = XFRMSYNC_SET_REPLAY;
	up.replay = *replay;
	rc = xfrmsync_update(*s->h, &id, &up);
	if (rc == 0)
		rc = xfrmsync_query(*s->h, &id, 0, &now);
	if (must_work)
		check(rc == 0, "%s on the %s SA: %s", what, s->name, outcome(rc));
	else
		check(clean(rc), "%s on the %s SA (a value of the other direction): %s", what, s->name, outcome(rc));
	if (rc == 0) {
		check(now.replay.seq == replay->seq && now.replay.oseq == replay->oseq &&
			      now.replay.seq_hi == replay->seq_hi && now.replay.oseq_hi == replay->oseq_hi &&
			      memcmp(now.replay.bmp, replay->bmp, sizeof(uint32_t) * replay->bmp_len) == 0,
		      "%s: read back oseq %u seq %u bitmap[0] 0x%x", s->name, now.replay.oseq, now.replay.seq,
		      replay->bmp_len ? now.replay.bmp[0] : 0);
		s->before = now;
	}
	return rc;
}

static void replay_values(void)
{
	struct dir_sa *out_legacy = &sas[0], *out_esn = &sas[1], *in_legacy = &sas[2], *in_esn = &sas[3];
	xfrmsync_replay r;
	int rc;

	line[0] = '\0';
	/* Each side's own value. */
	r = in_legacy->before.replay;
	r.seq += 100;
	r.bmp[0] = 0x1;
	if ((rc = set_replay(in_legacy, &r, "seq", 1)))
		line_add("seq on in legacy: %s; ", outcome(rc));
	r = out_legacy->before.replay;
	r.oseq += 100;
	if ((rc = set_replay(out_legacy, &r, "oseq", 1)))
		line_add("oseq on out legacy: %s; ", outcome(rc));
	r = in_esn->before.replay;
	r.seq += 100;
	r.bmp[0] = 0x1;
	if ((rc = set_replay(in_esn, &r, "ESN seq", 1)))
		line_add("seq on in ESN: %s; ", outcome(rc));
	r = out_esn->before.replay;
	r.oseq += 100;
	if ((rc = set_replay(out_esn, &r, "ESN oseq", 1)))
		line_add("oseq on out ESN: %s; ", outcome(rc));
	if (!line[0])
		line_add("each side's own value accepted (4 of 4); ");
	/* The other side's value: the NEWSA rules of 6.10 forbid them at
	 * install time; NEWAE may or may not. */
	r = out_legacy->before.replay;
	r.seq = 7;
	r.bmp[0] = 0x1;
	rc = set_replay(out_legacy, &r, "seq 7", 0);
	line_add("seq on an out SA: %s; ", rc ? outcome(rc) : "accepted");
	r = in_legacy->before.replay;
	r.oseq = 9;
	rc = set_replay(in_legacy, &r, "oseq 9", 0);
	line_add("oseq on an in SA: %s", rc ? outcome(rc) : "accepted");
	printf("fact: sa_dir.newae_replay: %s\n", line);
}

static void lifetimes(void)
{
	line[0] = '\0';
	for (size_t i = 0; i < N_SAS; i += 2) {
		struct dir_sa *s = &sas[i];
		xfrmsync_sa_id id = esp_sa("10.9.0.2", s->spi);
		xfrmsync_ae_update up;
		xfrmsync_aevent now;
		int rc;

		memset(&up, 0, sizeof(up));
		memset(&now, 0, sizeof(now));
		up.set = XFRMSYNC_SET_LIFETIME;
		up.lifetime = s->before.lifetime;
		up.lifetime.packets += 1000;
		up.lifetime.bytes += 64000;
		rc = xfrmsync_update(*s->h, &id, &up);
		if (rc == 0)
			rc = xfrmsync_query(*s->h, &id, 0, &now);
		check(rc == 0 && now.lifetime.packets == up.lifetime.packets && now.lifetime.bytes == up.lifetime.bytes,
		      "lifetime set on the %s SA: %" PRIu64 " packets (%s)", s->name, now.lifetime.packets,
		      outcome(rc));
		if (rc)
			line_add("%s%s: %s", line[0] ? "; " : "", side_name[s->in], outcome(rc));
	}
	printf("fact: sa_dir.newae_lifetime: %s\n", line[0] ? line : "accepted on out and in");
}

int main(int argc, char **argv)
{
	int kept, expected_hz;

	if (argc != 4 || (strcmp(argv[2], "in") && strcmp(argv[2], "none"))) {
		fprintf(stderr, "usage: %s UDP_SEND in|none EXPECTED_HZ\n", argv[0]);
		return 2;
	}
	udp_send = argv[1];
	kept = !strcmp(argv[2], "in");
	expected_hz = atoi(argv[3]);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("# SAs installed with XFRMA_SA_DIR; this kernel %s the direction\n", kept ? "keeps" : "ignores");
	if (!check(xfrmsync_handle_new_netns_path("/run/netns/a", &ha) == 0 &&
			   xfrmsync_handle_new_netns_path("/run/netns/b", &hb) == 0,
		   "handles in namespaces a and b"))
		return check_report("c-tests/sa_dir_test");
	measure_hz(expected_hz);
	queries(kept);
	thresholds();
	events();
	replay_values();
	lifetimes();
	xfrmsync_handle_free(ha);
	xfrmsync_handle_free(hb);
	return check_report("c-tests/sa_dir_test");
}

/* Real-kernel checks of the C API, run inside the test VM after
 * vmtest/guest/net-setup.sh built namespaces a and b with the SAs of its
 * table. Traffic goes a -> b through vmtest/guest/udp-send.
 *
 *   kernel_test UDP_SEND [EXPECTED_HZ]
 *
 * EXPECTED_HZ is CONFIG_HZ from the booted kernel's config file; the HZ the
 * library measures must equal it. */
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
static xfrmsync_handle *ha, *hb; /* namespaces a (sender) and b (receiver) */

/* Sends from namespace a; in the background when `background`. */
static int send_udp(const char *dst, int port, int count, int bytes, int interval_ms, int mark, int background)
{
	char cmd[512];

	snprintf(cmd, sizeof(cmd), "%s --netns /run/netns/a%s%.0d %s %d %d %d %d%s", udp_send,
		 mark ? " --mark " : "", mark, dst, port, count, bytes, interval_ms, background ? " &" : "");
	return system(cmd);
}

struct seen {
	int count;
	struct {
		uint32_t cause;
		uint32_t spi;
		uint64_t seq;
		uint32_t present;
		double at_ms;
	} ev[512];
};

static void collect(void *user_data, const xfrmsync_aevent *ev)
{
	struct seen *s = user_data;

	if (s->count >= (int)(sizeof(s->ev) / sizeof(s->ev[0])))
		return;
	s->ev[s->count].cause = ev->cause;
	s->ev[s->count].spi = ev->sa.spi;
	s->ev[s->count].seq = ((uint64_t)ev->replay.seq_hi << 32) | ev->replay.seq;
	s->ev[s->count].present = ev->present;
	s->ev[s->count].at_ms = now_ms();
	s->count++;
}

/* Polls the handle's fd and dispatches for `ms` milliseconds. Returns the
 * first dispatch error, or 0. */
static int pump(xfrmsync_handle *h, int ms)
{
	double end = now_ms() + ms;
	struct pollfd p = { .fd = xfrmsync_handle_fd(h), .events = POLLIN };
	int rc;

	for (;;) {
		double left = end - now_ms();
		if (left <= 0)
			return 0;
		if (poll(&p, 1, (int)left + 1) > 0) {
			rc = xfrmsync_dispatch(h);
			if (rc < 0)
				return rc;
		}
	}
}

static int count_cause(const struct seen *s, uint32_t cause)
{
	int n = 0;

	for (int i = 0; i < s->count; i++)
		n += s->ev[i].cause == cause;
	return n;
}

static void counters_match_traffic(void)
{
	xfrmsync_sa_id legacy = esp_sa("10.9.0.2", 0x1001), esn = esp_sa("10.9.0.2", 0x2001);
	xfrmsync_sa_id v6 = esp_sa("fd00:9::2", 0x3001), marked = esp_sa("10.9.0.2", 0x4001);
	xfrmsync_aevent in, out;

	check(send_udp("10.9.0.2", 9001, 12, 64, 5, 0, 0) == 0, "sent 12 x 64 bytes on 0x1001");
	check(send_udp("10.9.0.2", 9002, 10, 200, 5, 0, 0) == 0, "sent 10 x 200 bytes on ESN 0x2001");
	check(send_udp("fd00:9::2", 9003, 5, 100, 5, 0, 0) == 0, "sent 5 x 100 bytes on IPv6 0x3001");
	check(send_udp("10.9.0.2", 9004, 3, 50, 5, 7, 0) == 0, "sent 3 x 50 bytes with mark 7 on 0x4001");
	usleep(200 * 1000);

	if (check(xfrmsync_query(hb, &legacy, 0, &in) == 0 && xfrmsync_query(ha, &legacy, 0, &out) == 0,
		  "query legacy 0x1001 on both sides")) {
		check(!in.replay.esn && in.replay.seq == 12 && in.replay.bmp[0] == 0xfff,
		      "receiver: seq %u bitmap 0x%x (want 12, 0xfff)", in.replay.seq, in.replay.bmp[0]);
		check(in.lifetime.packets == 12 && in.lifetime.bytes == 12 * 72,
		      "receiver lifetime %" PRIu64 " packets %" PRIu64 " bytes (want 12, 864)", in.lifetime.packets,
		      in.lifetime.bytes);
		check(out.replay.oseq == 12 && out.lifetime.packets == 12 && out.lifetime.bytes == 864,
		      "sender: oseq %u, %" PRIu64 " packets, %" PRIu64 " bytes", out.replay.oseq,
		      out.lifetime.packets, out.lifetime.bytes);
		check(in.reqid == 1 && in.saddr[0] == 10 && in.saddr[3] == 1 && in.cause == 0,
		      "answer carries reqid 1, saddr 10.9.0.1, no cause");
	}
	if (check(xfrmsync_query(hb, &esn, 0, &in) == 0 && xfrmsync_query(ha, &esn, 0, &out) == 0,
		  "query ESN 0x2001 on both sides")) {
		check(in.replay.esn && in.replay.bmp_len == 4 && in.replay.replay_window == 128,
		      "ESN state: bmp_len %u window %u", in.replay.bmp_len, in.replay.replay_window);
		check(in.replay.seq == 10 && in.replay.bmp[0] == 0x3ff && in.lifetime.bytes == 10 * 208,
		      "receiver: seq %u bitmap[0] 0x%x bytes %" PRIu64, in.replay.seq, in.replay.bmp[0],
		      in.lifetime.bytes);
		check(out.replay.esn && out.replay.oseq == 10 && out.replay.oseq_hi == 0, "sender: oseq %u",
		      out.replay.oseq);
	}
	if (check(xfrmsync_query(hb, &v6, 0, &in) == 0 && xfrmsync_query(ha, &v6, 0, &out) == 0,
		  "query IPv6 0x3001 on both sides"))
		check(in.replay.seq == 5 && out.replay.oseq == 5 && in.lifetime.bytes == 5 * 108,
		      "IPv6: seq %u oseq %u bytes %" PRIu64, in.replay.seq, out.replay.oseq, in.lifetime.bytes);

	check(xfrmsync_query(hb, &marked, 0, &in) == -ESRCH, "marked SA without its mark: -ESRCH");
	marked.mark_value = 7;
	marked.mark_mask = 0xff;
	if (check(xfrmsync_query(hb, &marked, 0, &in) == 0 && xfrmsync_query(ha, &marked, 0, &out) == 0,
		  "marked SA with mark 7/0xff found on both sides")) {
		check(in.replay.seq == 3 && out.replay.oseq == 3, "marked: seq %u oseq %u", in.replay.seq,
		      out.replay.oseq);
		check(in.sa.mark_value == 7 && in.sa.mark_mask == 0xff, "answer carries the mark");
	}
}

static void unknown_sa(void)
{
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0xdead);
	xfrmsync_aevent ev;

	check(xfrmsync_query(hb, &sa, 0, &ev) == -ESRCH, "unknown SA: query -ESRCH");
	check(xfrmsync_set_thresholds(hb, &sa, 5, 1000) == -ESRCH, "unknown SA: set -ESRCH");
}

static void timer_threshold_in_ms(int expected_hz)
{
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0x1001), v6 = esp_sa("fd00:9::2", 0x3001);
	xfrmsync_aevent before, ev;
	uint32_t hz = 0;

	/* Each call runs before its check: C leaves the order of a call and the
	 * printf arguments beside it unspecified. */
	int rc = xfrmsync_query(hb, &sa, XFRMSYNC_QUERY_THRESHOLDS, &before);
	check(rc == 0 && before.present == (XFRMSYNC_HAS_REPLAY_THRESHOLD | XFRMSYNC_HAS_TIMER_THRESHOLD),
	      "default thresholds: %u packets, %u ms", before.replay_threshold, before.timer_threshold_ms);
	check(before.timer_threshold_ms == 1000 && before.replay_threshold == 2,
	      "defaults are the sysctls' (1000 ms, 2 packets)");
	rc = xfrmsync_calibrate_hz(hb, &sa, &hz);
	check(rc == 0, "HZ measured: %u", hz);
	if (expected_hz > 0)
		check(hz == (uint32_t)expected_hz, "measured HZ %u equals CONFIG_HZ %d", hz, expected_hz);
	rc = xfrmsync_query(hb, &sa, XFRMSYNC_QUERY_THRESHOLDS, &ev);
	check(rc == 0 && ev.timer_threshold_ms == before.timer_threshold_ms,
	      "calibration restored the timer threshold (%u ms)", ev.timer_threshold_ms);

	const struct {
		xfrmsync_sa_id *sa;
		uint32_t replay, set_ms, read_ms;
	} cases[] = {
		{ &sa, 7, 1500, 1500 }, { &sa, 7, 100, 100 },	{ &sa, 7, 3000, 3000 }, { &sa, 7, 60000, 60000 },
		/* Read back in the kernel's 100 ms steps, rounded down. */
		{ &sa, 7, 250, 200 },	{ &v6, 9, 2000, 2000 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		memset(&ev, 0, sizeof(ev));
		rc = xfrmsync_set_thresholds(hb, cases[i].sa, cases[i].replay, cases[i].set_ms);
		if (rc == 0)
			rc = xfrmsync_query(hb, cases[i].sa, XFRMSYNC_QUERY_THRESHOLDS, &ev);
		check(rc == 0 && ev.timer_threshold_ms == cases[i].read_ms && ev.replay_threshold == cases[i].replay,
		      "SPI 0x%x: timer set to %u ms reads back %u ms (want %u), replay threshold %u",
		      cases[i].sa->spi, cases[i].set_ms, ev.timer_threshold_ms, cases[i].read_ms, ev.replay_threshold);
	}
	xfrmsync_set_thresholds(hb, &sa, 2, 1000);
}

struct reentry {
	xfrmsync_handle *h;
	int dispatch_rc, query_rc, calls;
};

static void reenter(void *user_data, const xfrmsync_aevent *ev)
{
	struct reentry *r = user_data;
	xfrmsync_aevent now;

	r->calls++;
	r->dispatch_rc = xfrmsync_dispatch(r->h);
	r->query_rc = xfrmsync_query(r->h, &ev->sa, 0, &now);
}

static void update_event_follows_each_set(void)
{
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0x1001), other = esp_sa("10.9.0.1", 0x1002);
	struct seen mine = { 0 }, rest = { 0 };
	struct reentry r = { .h = hb };

	pump(hb, 100); /* drain older events */
	check(xfrmsync_on_sa_event(hb, &sa, collect, &mine) == 0 && xfrmsync_on_event(hb, collect, &rest) == 0,
	      "callbacks registered");
	for (int i = 0; i < 3; i++)
		xfrmsync_set_thresholds(hb, &sa, 3 + i, 1000);
	xfrmsync_set_thresholds(hb, &other, 4, 1000);
	pump(hb, 300);
	/* The closing timer event of earlier traffic may arrive in between. */
	check(count_cause(&mine, XFRMSYNC_CAUSE_UPDATE) == 3 &&
		      count_cause(&mine, XFRMSYNC_CAUSE_UPDATE) + count_cause(&mine, XFRMSYNC_CAUSE_TIMER) == mine.count,
	      "3 sets on 0x1001 gave %d update events to its callback", count_cause(&mine, XFRMSYNC_CAUSE_UPDATE));
	int with_thresholds = 0;
	for (int i = 0; i < mine.count; i++)
		with_thresholds += mine.ev[i].present != 0;
	check(mine.count > 0 && with_thresholds == 0, "update events carry no thresholds");
	/* Other SAs may still send their closing timer events meanwhile. */
	int other_updates = 0, leaked = 0;
	for (int i = 0; i < rest.count; i++) {
		other_updates += rest.ev[i].spi == 0x1002 && rest.ev[i].cause == XFRMSYNC_CAUSE_UPDATE;
		leaked += rest.ev[i].spi == 0x1001;
	}
	check(other_updates == 1 && leaked == 0,
	      "the catch-all got the other SA's update (%d) and none of 0x1001's (%d)", other_updates, leaked);

	xfrmsync_on_sa_event(hb, &sa, reenter, &r);
	xfrmsync_set_thresholds(hb, &sa, 2, 1000);
	pump(hb, 300);
	check(r.calls == 1 && r.dispatch_rc == -EBUSY && r.query_rc == 0,
	      "inside a callback: dispatch -EBUSY (%d), query allowed (%d)", r.dispatch_rc, r.query_rc);
	xfrmsync_on_sa_event(hb, &sa, NULL, NULL);
	xfrmsync_on_event(hb, NULL, NULL);
}

static void replay_events_follow_the_threshold(void)
{
	const int n = 5, k = 23;
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0x5001);
	struct seen s = { 0 };
	int rc, replay_events, ok_seqs = 1;

	/* Timer long enough that no timer event falls inside the burst. */
	check(xfrmsync_set_thresholds(hb, &sa, n, 10000) == 0, "0x5001: replay threshold %d, timer 10 s", n);
	pump(hb, 200);
	xfrmsync_on_sa_event(hb, &sa, collect, &s);
	send_udp("10.9.0.2", 9005, k, 32, 20, 0, 1);
	rc = pump(hb, 3000);
	check(rc == 0, "dispatch ok while receiving (%d)", rc);
	replay_events = count_cause(&s, XFRMSYNC_CAUSE_REPLAY);
	/* The kernel's rule: the first packet after an idle timer period fires a
	 * timer event; after it, an event each time seq moved n past the last. */
	check(s.count > 0 && s.ev[0].cause == XFRMSYNC_CAUSE_TIMER && s.ev[0].seq == 1,
	      "first packet after idle: timer event at seq %" PRIu64, s.count ? s.ev[0].seq : 0);
	check(replay_events == (k - 1) / n, "%d packets, threshold %d: %d replay events (rule says %d)", k, n,
	      replay_events, (k - 1) / n);
	for (int i = 0, r = 0; i < s.count; i++)
		if (s.ev[i].cause == XFRMSYNC_CAUSE_REPLAY)
			ok_seqs &= s.ev[i].seq == (uint64_t)(1 + n * ++r);
	check(ok_seqs, "replay events at seq 6, 11, 16, 21");
	xfrmsync_on_sa_event(hb, &sa, NULL, NULL);
}

static void timer_events_near_the_interval(void)
{
	const int interval = 500;
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0x6001);
	struct seen s = { 0 };
	double min_gap = 1e9, max_gap = 0, sum = 0;
	int gaps = 0;

	check(xfrmsync_set_thresholds(hb, &sa, 100000, interval) == 0, "0x6001: timer %d ms, replay off", interval);
	pump(hb, 200);
	xfrmsync_on_sa_event(hb, &sa, collect, &s);
	send_udp("10.9.0.2", 9006, 60, 32, 50, 0, 1);
	pump(hb, 4500);
	check(count_cause(&s, XFRMSYNC_CAUSE_REPLAY) == 0, "no replay events below the threshold");
	for (int i = 2; i < s.count; i++) {
		double gap = s.ev[i].at_ms - s.ev[i - 1].at_ms;
		if (s.ev[i].cause != XFRMSYNC_CAUSE_TIMER)
			continue;
		min_gap = gap < min_gap ? gap : min_gap;
		max_gap = gap > max_gap ? gap : max_gap;
		sum += gap;
		gaps++;
	}
	check(count_cause(&s, XFRMSYNC_CAUSE_TIMER) >= 4, "%d timer events during 3 s of traffic",
	      count_cause(&s, XFRMSYNC_CAUSE_TIMER));
	check(gaps > 0 && sum / gaps > interval * 0.8 && sum / gaps < interval * 1.4 && min_gap > interval * 0.6,
	      "timer events every %.0f ms on average (min %.0f, max %.0f) for %d ms", gaps ? sum / gaps : 0, min_gap,
	      max_gap, interval);
	xfrmsync_on_sa_event(hb, &sa, NULL, NULL);
}

static void values_round_trip(void)
{
	xfrmsync_sa_id legacy = esp_sa("10.9.0.1", 0x1002), esn = esp_sa("10.9.0.2", 0x7001);
	xfrmsync_ae_update up;
	xfrmsync_aevent ev, now;
	int rc;

	memset(&up, 0, sizeof(up));
	check(xfrmsync_query(hb, &legacy, 0, &ev) == 0, "query 0x1002 (outbound from b)");
	up.set = XFRMSYNC_SET_REPLAY | XFRMSYNC_SET_LIFETIME;
	up.replay.oseq = 1000;
	up.replay.seq = 500;
	up.replay.bmp_len = 1;
	up.replay.bmp[0] = 0xf0f0;
	up.lifetime = ev.lifetime;
	up.lifetime.bytes = 123456;
	up.lifetime.packets = 789;
	check(xfrmsync_update(hb, &legacy, &up) == 0 && xfrmsync_query(hb, &legacy, 0, &now) == 0,
	      "legacy replay + lifetime set");
	check(now.replay.oseq == 1000 && now.replay.seq == 500 && now.replay.bmp[0] == 0xf0f0,
	      "legacy replay round-trips: oseq %u seq %u bitmap 0x%x", now.replay.oseq, now.replay.seq,
	      now.replay.bmp[0]);
	check(now.lifetime.bytes == 123456 && now.lifetime.packets == 789 && now.lifetime.add_time == ev.lifetime.add_time,
	      "lifetime round-trips: %" PRIu64 " bytes %" PRIu64 " packets", now.lifetime.bytes,
	      now.lifetime.packets);

	rc = xfrmsync_update(hb, &esn, &up);
	check(rc == -EINVAL && strstr(xfrmsync_last_error(), "ESN"),
	      "legacy value on an ESN SA refused, not silently ignored: %s", xfrmsync_last_error());

	check(xfrmsync_query(hb, &esn, 0, &ev) == 0 && ev.replay.esn && ev.replay.bmp_len == 4, "query ESN 0x7001");
	memset(&up, 0, sizeof(up));
	up.set = XFRMSYNC_SET_REPLAY;
	up.replay = ev.replay;
	up.replay.oseq = 0x10;
	up.replay.oseq_hi = 1;
	up.replay.seq = 0x20;
	up.replay.seq_hi = 2;
	up.replay.bmp[0] = 0xdeadbeef;
	up.replay.bmp[3] = 0x80000001;
	check(xfrmsync_update(hb, &esn, &up) == 0 && xfrmsync_query(hb, &esn, 0, &now) == 0, "ESN replay set");
	check(now.replay.esn && now.replay.oseq == 0x10 && now.replay.oseq_hi == 1 && now.replay.seq == 0x20 &&
		      now.replay.seq_hi == 2 && now.replay.replay_window == 128,
	      "ESN replay round-trips: oseq %u:%u seq %u:%u window %u", now.replay.oseq_hi, now.replay.oseq,
	      now.replay.seq_hi, now.replay.seq, now.replay.replay_window);
	check(memcmp(now.replay.bmp, up.replay.bmp, 4 * sizeof(uint32_t)) == 0, "ESN bitmap round-trips");
	up.replay.bmp_len = 2;
	rc = xfrmsync_update(hb, &esn, &up);
	check(rc == -EINVAL, "ESN value with another bitmap length refused: %s", xfrmsync_last_error());
}

static void lost_events_are_reported(void)
{
	xfrmsync_handle *small = NULL;
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0x1001);
	int rc, again;

	if (!check(xfrmsync_handle_new_netns_path("/run/netns/b", &small) == 0, "second handle in b"))
		return;
	xfrmsync_handle_set_rcvbuf(small, 1);
	for (int i = 0; i < 200; i++)
		xfrmsync_set_thresholds(hb, &sa, 2, 1000);
	rc = xfrmsync_dispatch(small);
	check(rc == -ENOBUFS, "overflowed event socket reports -ENOBUFS (got %d): %s", rc, xfrmsync_last_error());
	again = xfrmsync_dispatch(small);
	check(again >= 0, "after -ENOBUFS the handle goes on (%d)", again);
	xfrmsync_handle_free(small);
}

int main(int argc, char **argv)
{
	int expected_hz = argc > 2 ? atoi(argv[2]) : 0;

	if (argc < 2) {
		fprintf(stderr, "usage: %s UDP_SEND [EXPECTED_HZ]\n", argv[0]);
		return 2;
	}
	udp_send = argv[1];
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!check(xfrmsync_handle_new_netns_path("/run/netns/a", &ha) == 0 &&
			   xfrmsync_handle_new_netns_path("/run/netns/b", &hb) == 0,
		   "handles in namespaces a and b"))
		return check_report("c-tests/kernel_test");
	/* SAs must have been idle for one default timer period (1 s) so that
	 * the first packet of each burst fires the kernel's idle timer event. */
	sleep(2);
	counters_match_traffic();
	unknown_sa();
	timer_threshold_in_ms(expected_hz);
	update_event_follows_each_set();
	replay_events_follow_the_threshold();
	timer_events_near_the_interval();
	values_round_trip();
	lost_events_are_reported();
	xfrmsync_handle_free(ha);
	xfrmsync_handle_free(hb);
	return check_report("c-tests/kernel_test");
}

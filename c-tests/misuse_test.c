/* C API misuse, under AddressSanitizer and UndefinedBehaviorSanitizer
 * (issue 9): each case works as the header documents or returns an error,
 * never a crash, a sanitizer report or a leak.
 *
 *   misuse_test        the cases that need no SA: any host with XFRM
 *                      netlink, as root
 *   misuse_test --vm   also the cases that need events, inside the test VM
 *                      after vmtest/guest/net-setup.sh built namespace b; it
 *                      adds an SA of its own there (SPI 0x9901) and deletes
 *                      it at the end, so no other test's SA is touched
 *
 * Events come from update events: a second handle sets a threshold on the
 * SA and the kernel multicasts one `CU` event per request, so no traffic is
 * needed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netlink.h>
#include <linux/xfrm.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

#define NETNS "/run/netns/b"
#define SPI 0x9901

static void ignore_event(void *user_data, const xfrmsync_aevent *ev)
{
	(void)user_data, (void)ev;
}

static void ignore_applied(void *user_data, const xfrmsync_sa_id *sa, uint32_t r, uint32_t t, int result)
{
	(void)user_data, (void)sa, (void)r, (void)t, (void)result;
}

/* Every call that takes a pointer, given NULL where it can be. */
static void null_everywhere(void)
{
	xfrmsync_handle *h = NULL;
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0x1001);
	xfrmsync_aevent ev;
	xfrmsync_ae_update up;
	xfrmsync_rule rule;
	xfrmsync_netns_defaults defaults;
	char buf[64];
	uint32_t hz;

	memset(&ev, 0, sizeof(ev));
	memset(&up, 0, sizeof(up));
	memset(&rule, 0, sizeof(rule));
	check(xfrmsync_version() != NULL && xfrmsync_last_error() != NULL, "version and last error are never NULL");
	xfrmsync_handle_free(NULL);
	check(xfrmsync_handle_new(NULL) == -EINVAL, "handle_new(NULL)");
	check(xfrmsync_handle_new_netns_path(NULL, &h) == -EINVAL && h == NULL, "handle_new_netns_path(NULL, out)");
	check(xfrmsync_handle_new_netns_path("/proc/self/ns/net", NULL) == -EINVAL,
	      "handle_new_netns_path(path, NULL)");
	check(xfrmsync_handle_new_netns_fd(-1, NULL) == -EINVAL, "handle_new_netns_fd(-1, NULL)");
	check(xfrmsync_handle_fd(NULL) == -EINVAL, "handle_fd(NULL)");
	check(xfrmsync_handle_subscribe(NULL, true) == -EINVAL, "handle_subscribe(NULL)");
	check(xfrmsync_handle_set_rcvbuf(NULL, 1 << 20) == -EINVAL, "handle_set_rcvbuf(NULL)");
	check(xfrmsync_handle_set_dispatch_limit(NULL, 1) == -EINVAL, "handle_set_dispatch_limit(NULL)");
	check(xfrmsync_caused(NULL, &ev) == -EINVAL, "caused(NULL, ev)");
	check(xfrmsync_query(NULL, &sa, 0, &ev) == -EINVAL, "query(NULL, ...)");
	check(xfrmsync_update(NULL, &sa, &up) == -EINVAL, "update(NULL, ...)");
	check(xfrmsync_set_thresholds(NULL, &sa, 1, 1000) == -EINVAL, "set_thresholds(NULL, ...)");
	check(xfrmsync_calibrate_hz(NULL, &sa, &hz) == -EINVAL, "calibrate_hz(NULL, ...)");
	check(xfrmsync_netns_defaults_read(NULL, NULL) == -EINVAL, "netns_defaults_read(NULL, NULL)");
	check(xfrmsync_netns_defaults_write(NULL, NULL) == -EINVAL, "netns_defaults_write(NULL, NULL)");
	check(xfrmsync_on_event(NULL, ignore_event, NULL) == -EINVAL, "on_event(NULL, ...)");
	check(xfrmsync_on_sa_event(NULL, &sa, ignore_event, NULL) == -EINVAL, "on_sa_event(NULL, ...)");
	check(xfrmsync_dispatch(NULL) == -EINVAL, "dispatch(NULL)");
	check(xfrmsync_aevent_format(NULL, false, buf, sizeof(buf)) == -EINVAL, "aevent_format(NULL, ...)");
	check(xfrmsync_rule_add(NULL, &rule) == -EINVAL, "rule_add(NULL, rule)");
	check(xfrmsync_rule_remove(NULL, "x") == -EINVAL, "rule_remove(NULL, name)");
	check(xfrmsync_register_sa(NULL, &sa, 1, 1000) == -EINVAL, "register_sa(NULL, ...)");
	check(xfrmsync_unregister_sa(NULL, &sa) == -EINVAL, "unregister_sa(NULL, ...)");
	check(xfrmsync_on_applied(NULL, ignore_applied, NULL) == -EINVAL, "on_applied(NULL, ...)");
	check(xfrmsync_on_applied_rule(NULL, NULL, NULL) == -EINVAL, "on_applied_rule(NULL, ...)");
	check(xfrmsync_relist_due_ms(NULL) == -EINVAL, "relist_due_ms(NULL)");
	check(xfrmsync_handle_port_id(NULL) == -EINVAL, "handle_port_id(NULL)");
	check(xfrmsync_newsa_add_thresholds(NULL, buf, sizeof(buf)) == -EINVAL, "newsa_add_thresholds(NULL, ...)");

	if (!check(xfrmsync_handle_new(&h) == 0, "a handle for the NULL arguments after it"))
		return;
	check(xfrmsync_caused(h, NULL) == -EINVAL, "caused(h, NULL)");
	check(xfrmsync_query(h, NULL, 0, &ev) == -EINVAL, "query(h, NULL sa)");
	check(xfrmsync_query(h, &sa, 0, NULL) == -EINVAL || xfrmsync_query(h, &sa, 0, NULL) == -ESRCH,
	      "query(h, sa, NULL out): an error, nothing written");
	check(xfrmsync_update(h, NULL, &up) == -EINVAL, "update(h, NULL sa)");
	check(xfrmsync_update(h, &sa, NULL) == -EINVAL, "update(h, sa, NULL)");
	check(xfrmsync_set_thresholds(h, NULL, 1, 1000) == -EINVAL, "set_thresholds(h, NULL)");
	check(xfrmsync_calibrate_hz(h, NULL, &hz) == -EINVAL, "calibrate_hz(h, NULL sa)");
	check(xfrmsync_on_event(h, NULL, NULL) == 0, "on_event(h, NULL): removes (none)");
	check(xfrmsync_on_sa_event(h, NULL, ignore_event, NULL) == -EINVAL, "on_sa_event(h, NULL sa)");
	check(xfrmsync_on_sa_event(h, &sa, NULL, NULL) == 0, "on_sa_event(h, sa, NULL): removes (none)");
	check(xfrmsync_rule_add(h, NULL) == -EINVAL, "rule_add(h, NULL)");
	rule.name = NULL;
	check(xfrmsync_rule_add(h, &rule) == -EINVAL, "rule_add with a NULL name");
	check(xfrmsync_rule_remove(h, NULL) == -EINVAL, "rule_remove(h, NULL)");
	check(xfrmsync_register_sa(h, NULL, 1, 1000) == -EINVAL, "register_sa(h, NULL)");
	check(xfrmsync_unregister_sa(h, NULL) == -EINVAL, "unregister_sa(h, NULL)");
	check(xfrmsync_on_applied(h, NULL, NULL) == 0, "on_applied(h, NULL): removes (none)");
	check(xfrmsync_on_applied_rule(h, NULL, NULL) == 0, "on_applied_rule(h, NULL): removes (none)");
	check(xfrmsync_newsa_add_thresholds(h, NULL, 64) == -EINVAL, "newsa_add_thresholds(h, NULL, 64)");
	check(xfrmsync_newsa_add_thresholds(h, buf, 0) < 0, "newsa_add_thresholds(h, buf, 0): an error");
	memset(buf, 0xff, sizeof(buf));
	check(xfrmsync_newsa_add_thresholds(h, buf, sizeof(buf)) < 0, "newsa_add_thresholds on garbage: an error");
	check(xfrmsync_netns_defaults_read("/nonexistent", &defaults) < 0, "netns_defaults_read of a missing path");
	xfrmsync_handle_free(h);
}

/* snprintf's contract at its edges: a 0-byte buffer is not written at all,
 * a 1-byte one gets only the NUL; both measure the whole line. */
static void format_tiny_buffers(void)
{
	xfrmsync_aevent ev;
	char *one = malloc(1), guard[8];
	int whole, n;

	memset(&ev, 0, sizeof(ev));
	ev.sa = esp_sa("10.9.0.2", 0x1001);
	ev.flags = ev.cause = XFRMSYNC_CAUSE_REPLAY;
	ev.replay.bmp_len = 1;
	whole = xfrmsync_aevent_format(&ev, false, NULL, 0);
	check(whole > 0, "NULL, 0 measures the line: %d", whole);
	memset(guard, 'x', sizeof(guard));
	n = xfrmsync_aevent_format(&ev, false, guard + 4, 0);
	check(n == whole && memcmp(guard, "xxxxxxxx", 8) == 0, "0-byte buffer: nothing written, length %d", n);
	n = xfrmsync_aevent_format(&ev, true, guard + 4, 0);
	check(n > whole && memcmp(guard, "xxxxxxxx", 8) == 0, "0-byte buffer, JSON: nothing written, length %d", n);
	one[0] = 'x';
	n = xfrmsync_aevent_format(&ev, false, one, 1);
	check(n == whole && one[0] == '\0', "1-byte buffer (heap, exact size): only the NUL, length %d", n);
	n = xfrmsync_aevent_format(&ev, true, one, 1);
	check(n > whole && one[0] == '\0', "1-byte buffer, JSON: only the NUL");
	check(xfrmsync_aevent_format(&ev, false, NULL, 5) == -EINVAL, "NULL with a length: -EINVAL");
	ev.sa.family = 99;
	check(xfrmsync_aevent_format(&ev, false, one, 1) == -EINVAL, "an event of an unknown family: -EINVAL");
	ev.sa.family = AF_INET;
	ev.replay.esn = 1;
	ev.replay.bmp_len = 129;
	check(xfrmsync_aevent_format(&ev, false, one, 1) == -EINVAL, "an ESN bitmap of 129 words: -EINVAL");
	free(one);
}

/* A handle opened on one thread, used on a second after the first ended,
 * and freed on a third: handles may move, one thread at a time. */
struct relay {
	xfrmsync_handle *h;
	int rc[3];
	char error[128];
};

static void *first_thread(void *arg)
{
	struct relay *r = arg;

	r->rc[0] = xfrmsync_handle_new(&r->h);
	if (r->rc[0] == 0) {
		r->rc[1] = xfrmsync_on_event(r->h, ignore_event, NULL);
		r->rc[2] = xfrmsync_dispatch(r->h);
	}
	return NULL;
}

static void *second_thread(void *arg)
{
	struct relay *r = arg;
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0xdead);
	xfrmsync_aevent ev;

	r->rc[0] = xfrmsync_dispatch(r->h);
	r->rc[1] = xfrmsync_query(r->h, &sa, 0, &ev);
	snprintf(r->error, sizeof(r->error), "%s", xfrmsync_last_error());
	r->rc[2] = xfrmsync_handle_set_dispatch_limit(r->h, 4);
	return NULL;
}

static void *third_thread(void *arg)
{
	struct relay *r = arg;

	xfrmsync_handle_free(r->h);
	return NULL;
}

static void two_threads_one_after_another(void)
{
	struct relay r;
	pthread_t t;

	memset(&r, 0, sizeof(r));
	pthread_create(&t, NULL, first_thread, &r);
	pthread_join(t, NULL);
	if (!check(r.rc[0] == 0 && r.rc[1] == 0 && r.rc[2] >= 0, "thread 1 opens, sets a callback, dispatches"))
		return;
	pthread_create(&t, NULL, second_thread, &r);
	pthread_join(t, NULL);
	check(r.rc[0] >= 0 && r.rc[1] == -ESRCH && r.rc[2] == 0,
	      "thread 2 dispatches, queries (-ESRCH: %d), sets the limit", r.rc[1]);
	check(strstr(r.error, "GETAE") != NULL, "thread 2's last error is its own: %s", r.error);
	pthread_create(&t, NULL, third_thread, &r);
	pthread_join(t, NULL);
	check(1, "thread 3 frees it");
}

/* --- the cases that need events (--vm) ------------------------------------ */

static int sh(const char *cmd)
{
	int rc = system(cmd);

	return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static xfrmsync_handle *open_b(void)
{
	xfrmsync_handle *h = NULL;

	if (xfrmsync_handle_new_netns_path(NETNS, &h) != 0)
		return NULL;
	return h;
}

/* Has the setter send `n` threshold updates: `n` update events for every
 * handle of namespace b, pending until dispatched. */
static int updates(xfrmsync_handle *setter, const xfrmsync_sa_id *sa, int n)
{
	xfrmsync_ae_update up;

	memset(&up, 0, sizeof(up));
	up.set = XFRMSYNC_SET_REPLAY_THRESHOLD;
	for (int i = 0; i < n; i++) {
		up.replay_threshold = 10 + i;
		if (xfrmsync_update(setter, sa, &up) != 0)
			return -1;
	}
	usleep(50 * 1000);
	return 0;
}

static int dispatch_all(xfrmsync_handle *h)
{
	struct pollfd p = { .fd = xfrmsync_handle_fd(h), .events = POLLIN };
	int total = 0, rc;

	while (poll(&p, 1, 100) > 0) {
		rc = xfrmsync_dispatch(h);
		if (rc < 0)
			return rc;
		total += rc;
	}
	return total;
}

struct reentry {
	xfrmsync_handle *h;
	xfrmsync_sa_id sa;
	int calls, dispatch_rc, on_event_rc, on_sa_rc, rule_rc, register_rc, query_rc, caused_rc, format_rc,
		limit_rc;
};

static void reenter(void *user_data, const xfrmsync_aevent *ev)
{
	struct reentry *r = user_data;
	xfrmsync_aevent now;
	xfrmsync_rule rule;
	char line[256];

	if (r->calls++ > 0)
		return;
	memset(&rule, 0, sizeof(rule));
	rule.name = "inside";
	r->dispatch_rc = xfrmsync_dispatch(r->h);
	r->on_event_rc = xfrmsync_on_event(r->h, ignore_event, NULL);
	r->on_sa_rc = xfrmsync_on_sa_event(r->h, &r->sa, ignore_event, NULL);
	r->rule_rc = xfrmsync_rule_add(r->h, &rule);
	r->register_rc = xfrmsync_register_sa(r->h, &r->sa, 5, 1000);
	r->query_rc = xfrmsync_query(r->h, &r->sa, XFRMSYNC_QUERY_THRESHOLDS, &now);
	r->caused_rc = xfrmsync_caused(r->h, ev);
	r->format_rc = xfrmsync_aevent_format(ev, true, line, sizeof(line));
	r->limit_rc = xfrmsync_handle_set_dispatch_limit(r->h, 64);
}

static void reentering_callback(xfrmsync_handle *setter, const xfrmsync_sa_id *sa)
{
	struct reentry r;
	int n;

	memset(&r, 0, sizeof(r));
	r.sa = *sa;
	if (!check((r.h = open_b()) != NULL, "watcher handle in b"))
		return;
	check(xfrmsync_on_sa_event(r.h, sa, reenter, &r) == 0, "callback that re-enters the library");
	updates(setter, sa, 3);
	n = dispatch_all(r.h);
	/* The namespace's other SAs may add an event of their own (seen once on
	 * 5.10): what matters is this SA's three, each to the callback. */
	check(n >= 3 && r.calls == 3, "3 update events of the SA dispatched (%d in all), callback ran 3 times (%d)", n,
	      r.calls);
	check(r.dispatch_rc == -EBUSY, "dispatch from inside: -EBUSY (%d)", r.dispatch_rc);
	check(r.on_event_rc == -EBUSY && r.on_sa_rc == -EBUSY, "on_event / on_sa_event from inside: -EBUSY");
	check(r.rule_rc == -EBUSY && r.register_rc == -EBUSY, "rule_add / register_sa from inside: -EBUSY (%d, %d)",
	      r.rule_rc, r.register_rc);
	check(r.query_rc == 0, "query from inside works (%d)", r.query_rc);
	check(r.caused_rc == 0, "caused from inside: not this handle's update (%d)", r.caused_rc);
	check(r.format_rc > 0 && r.limit_rc == 0, "format and set_dispatch_limit from inside work");
	xfrmsync_handle_free(r.h);
}

struct closer {
	xfrmsync_handle *h;
	int calls, after_free_rc, after_free_fd;
};

static void close_inside(void *user_data, const xfrmsync_aevent *ev)
{
	struct closer *c = user_data;
	xfrmsync_aevent now;

	(void)ev;
	c->calls++;
	xfrmsync_handle_free(c->h);
	xfrmsync_handle_free(c->h); /* twice: still only marked */
	c->after_free_rc = xfrmsync_query(c->h, &ev->sa, 0, &now);
	c->after_free_fd = xfrmsync_handle_fd(c->h);
}

static void applied_close_inside(void *user_data, const xfrmsync_sa_id *sa, uint32_t r, uint32_t t, int result)
{
	struct closer *c = user_data;

	(void)sa, (void)r, (void)t, (void)result;
	c->calls++;
	xfrmsync_handle_free(c->h);
}

static void closing_from_inside(xfrmsync_handle *setter, const xfrmsync_sa_id *sa)
{
	struct closer c;
	xfrmsync_rule rule;
	int rc;

	memset(&c, 0, sizeof(c));
	if (!check((c.h = open_b()) != NULL, "handle to be freed from its own event callback"))
		return;
	check(xfrmsync_on_event(c.h, close_inside, &c) == 0, "catch-all callback that frees the handle");
	updates(setter, sa, 5);
	rc = xfrmsync_dispatch(c.h); /* frees c.h on return */
	check(rc >= 1, "dispatch returns normally after its callback freed the handle (%d)", rc);
	check(c.calls == 1, "no callback of a freed handle runs: %d of 5 events delivered", c.calls);
	check(c.after_free_rc == -EINVAL && c.after_free_fd == -EINVAL,
	      "calls on the handle after it was freed, inside the callback: -EINVAL (%d, %d)", c.after_free_rc,
	      c.after_free_fd);

	memset(&c, 0, sizeof(c));
	if (!check((c.h = open_b()) != NULL, "handle to be freed from its applied callback"))
		return;
	memset(&rule, 0, sizeof(rule));
	rule.name = "free-inside";
	rule.match = XFRMSYNC_MATCH_SPI;
	rule.spi = sa->spi;
	rule.replay_threshold = 7;
	rule.timer_threshold_ms = 1000;
	check(xfrmsync_on_applied(c.h, applied_close_inside, &c) == 0, "applied callback that frees the handle");
	rc = xfrmsync_rule_add(c.h, &rule); /* frees c.h on return */
	check(rc == 0 && c.calls == 1, "rule_add returns %d after its applied callback freed the handle", rc);
}

static void freeing_with_events_pending(xfrmsync_handle *setter, const xfrmsync_sa_id *sa)
{
	xfrmsync_handle *h = open_b();
	struct pollfd p;

	if (!check(h != NULL, "handle with events to leave pending"))
		return;
	check(xfrmsync_on_sa_event(h, sa, ignore_event, NULL) == 0 && xfrmsync_on_event(h, ignore_event, NULL) == 0,
	      "callbacks registered");
	updates(setter, sa, 20);
	p.fd = xfrmsync_handle_fd(h);
	p.events = POLLIN;
	check(poll(&p, 1, 1000) == 1, "events are pending");
	xfrmsync_handle_free(h);
	check(1, "freed with 20 events pending (AddressSanitizer checks the leak)");
}

/* Counts the events one handle's updates caused: other events of the SA
   (a timer event of earlier traffic) may arrive at any time. */
struct caused_by {
	xfrmsync_handle *setter;
	int count;
};

static void count_caused(void *user_data, const xfrmsync_aevent *ev)
{
	struct caused_by *c = user_data;

	if (xfrmsync_caused(c->setter, ev) == 1)
		c->count++;
}

static void *dispatch_on_thread(void *arg)
{
	xfrmsync_handle *h = arg;

	return (void *)(intptr_t)dispatch_all(h);
}

static void events_across_threads(xfrmsync_handle *setter, const xfrmsync_sa_id *sa)
{
	xfrmsync_handle *h = open_b();
	struct caused_by caused = { .setter = setter };
	int count = 0;
	void *got;
	pthread_t t;

	if (!check(h != NULL, "handle for two threads"))
		return;
	check(xfrmsync_on_sa_event(h, sa, count_caused, &caused) == 0, "callback registered on the opening thread");
	check(xfrmsync_handle_set_dispatch_limit(h, 2) == 0, "dispatch limit 2");
	updates(setter, sa, 4);
	pthread_create(&t, NULL, dispatch_on_thread, h);
	pthread_join(t, &got);
	count += (int)(intptr_t)got;
	updates(setter, sa, 4);
	pthread_create(&t, NULL, dispatch_on_thread, h);
	pthread_join(t, &got);
	count += (int)(intptr_t)got;
	check(count >= 8 && caused.count == 8,
	      "two threads one after the other dispatched all 8 update events (%d of %d dispatched)", caused.count, count);
	xfrmsync_handle_free(h);
}

static void with_events(void)
{
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", SPI);
	xfrmsync_handle *setter;

	sh("ip -n b xfrm state delete src 10.9.0.1 dst 10.9.0.2 proto esp spi 0x9901 2>/dev/null");
	if (!check(sh("ip -n b xfrm state add src 10.9.0.1 dst 10.9.0.2 proto esp spi 0x9901 reqid 99 mode transport"
		      " auth-trunc 'hmac(sha256)' 0x0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
		      " 128 enc 'cbc(aes)' 0x0123456789abcdef0123456789abcdef") == 0,
		   "SA 0x9901 of this test added in namespace b"))
		return;
	if (!check((setter = open_b()) != NULL, "setter handle in b"))
		return;
	/* The rule below sets a timer threshold, which needs HZ. */
	if (xfrmsync_learn_kernel_hz(NULL) < 0)
		xfrmsync_set_kernel_hz(250);
	xfrmsync_handle_subscribe(setter, false);
	reentering_callback(setter, &sa);
	closing_from_inside(setter, &sa);
	freeing_with_events_pending(setter, &sa);
	events_across_threads(setter, &sa);
	xfrmsync_handle_free(setter);
	sh("ip -n b xfrm state delete src 10.9.0.1 dst 10.9.0.2 proto esp spi 0x9901");
}

int main(int argc, char **argv)
{
	null_everywhere();
	format_tiny_buffers();
	two_threads_one_after_another();
	if (argc > 1 && strcmp(argv[1], "--vm") == 0)
		with_events();
	return check_report(argc > 1 ? "c-tests/misuse_test --vm" : "c-tests/misuse_test");
}

/* C API checks that need no SA: argument validation, versions, the handle's
 * fd, error reporting, formatting. Runs on any Linux host with XFRM netlink,
 * as root, under valgrind or AddressSanitizer. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, for check.h */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/xfrm.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "check.h"

static void versions(void)
{
	char expect[32];

	snprintf(expect, sizeof(expect), "%d.%d.%d", XFRMSYNC_VERSION_MAJOR, XFRMSYNC_VERSION_MINOR,
		 XFRMSYNC_VERSION_PATCH);
	check(strcmp(xfrmsync_version(), expect) == 0, "library version %s matches header macros %s",
	      xfrmsync_version(), expect);
	check(strcmp(XFRMSYNC_VERSION_STRING, expect) == 0, "XFRMSYNC_VERSION_STRING is %s", expect);
	check(XFRMSYNC_VERSION_NUMBER == ((XFRMSYNC_VERSION_MAJOR << 16) | (XFRMSYNC_VERSION_MINOR << 8) |
					  XFRMSYNC_VERSION_PATCH),
	      "XFRMSYNC_VERSION_NUMBER orders as 0xMMmmpp");
}

static void null_arguments(void)
{
	xfrmsync_handle *h = (xfrmsync_handle *)0x1;
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0x1001);
	xfrmsync_aevent ev;
	xfrmsync_ae_update up;

	memset(&up, 0, sizeof(up));
	xfrmsync_handle_free(NULL);
	check(1, "xfrmsync_handle_free(NULL) is a no-op");
	check(xfrmsync_handle_new(NULL) == -EINVAL, "handle_new(NULL) gives -EINVAL");
	check(xfrmsync_handle_new_netns_path(NULL, &h) == -EINVAL && h == (xfrmsync_handle *)0x1,
	      "netns path NULL gives -EINVAL and leaves *out alone");
	check(xfrmsync_handle_fd(NULL) == -EINVAL, "handle_fd(NULL) gives -EINVAL");
	check(xfrmsync_query(NULL, &sa, 0, &ev) == -EINVAL, "query with NULL handle gives -EINVAL");
	check(xfrmsync_update(NULL, &sa, &up) == -EINVAL, "update with NULL handle gives -EINVAL");
	check(xfrmsync_dispatch(NULL) == -EINVAL, "dispatch(NULL) gives -EINVAL");
	check(xfrmsync_on_event(NULL, NULL, NULL) == -EINVAL, "on_event(NULL) gives -EINVAL");
	check(xfrmsync_set_kernel_hz(0) == -EINVAL, "kernel HZ 0 is refused");
	check(strlen(xfrmsync_last_error()) > 0, "a failed call leaves a message: %s", xfrmsync_last_error());
	check(xfrmsync_handle_new_netns_path("/nonexistent/netns", &h) == -ENOENT && h == (xfrmsync_handle *)0x1,
	      "missing netns path gives -ENOENT");
	check(xfrmsync_handle_new_netns_fd(-1, &h) == -EINVAL, "netns fd -1 gives -EINVAL");
	check(xfrmsync_handle_set_dispatch_limit(NULL, 1) == -EINVAL, "dispatch limit on NULL gives -EINVAL");
	check(xfrmsync_caused(NULL, NULL) == -EINVAL, "caused(NULL) gives -EINVAL");
}

static void with_handle(void)
{
	xfrmsync_handle *h = NULL;
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0xdead);
	xfrmsync_aevent ev;
	xfrmsync_ae_update up;
	int fd, rc;

	if (!check(xfrmsync_handle_new(&h) == 0 && h != NULL, "handle opens in this namespace"))
		return;
	fd = xfrmsync_handle_fd(h);
	check(fd >= 0, "event fd %d", fd);
	check((fcntl(fd, F_GETFL) & O_NONBLOCK) != 0, "event fd is non-blocking");
	check((fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0, "event fd is close-on-exec");
	check(xfrmsync_handle_set_rcvbuf(h, 1 << 20) == 0, "receive buffer settable");
	check(xfrmsync_dispatch(h) >= 0, "dispatch with nothing pending returns at once");
	check(xfrmsync_relist_due_ms(h) == -1, "no listing owed on a new handle");
	check(xfrmsync_handle_port_id(h) > 0, "the request port id is the kernel's, not 0 (%lld)",
	      (long long)xfrmsync_handle_port_id(h));

	memset(&ev, 0x5a, sizeof(ev));
	rc = xfrmsync_query(h, &sa, XFRMSYNC_QUERY_THRESHOLDS, &ev);
	check(rc == -ESRCH, "unknown SA gives -ESRCH (got %d)", rc);
	check(strstr(xfrmsync_last_error(), "GETAE") != NULL, "message names the request: %s",
	      xfrmsync_last_error());
	check(ev.reqid == 0x5a5a5a5a, "out-parameter untouched on failure");

	memset(&up, 0, sizeof(up));
	check(xfrmsync_update(h, &sa, &up) == -EINVAL, "update setting nothing gives -EINVAL");
	up.set = 0x100;
	check(xfrmsync_update(h, &sa, &up) == -EINVAL, "unknown update bits give -EINVAL");
	up.set = XFRMSYNC_SET_REPLAY;
	up.replay.esn = 1;
	up.replay.bmp_len = 129;
	check(xfrmsync_update(h, &sa, &up) == -EINVAL, "ESN bitmap over 128 words gives -EINVAL");
	up.replay.bmp_len = 1;
	up.replay.replay_window = 33;
	check(xfrmsync_update(h, &sa, &up) == -EINVAL, "ESN window above its bitmap gives -EINVAL");
	up.set = XFRMSYNC_SET_REPLAY_THRESHOLD;
	up.replay_threshold = 3;
	rc = xfrmsync_update(h, &sa, &up);
	check(rc == -ESRCH, "setting thresholds on an unknown SA gives -ESRCH (got %d)", rc);
	sa.family = 99;
	check(xfrmsync_query(h, &sa, 0, &ev) == -EINVAL, "unknown address family gives -EINVAL");
	sa.family = AF_INET;
	check(xfrmsync_query(h, &sa, 0x80, &ev) == -EINVAL, "unknown query flags give -EINVAL");
	check(xfrmsync_on_sa_event(h, &sa, NULL, NULL) == 0, "removing an absent callback is fine");
	check(xfrmsync_handle_subscribe(h, false) == 0 && xfrmsync_handle_subscribe(h, true) == 0,
	      "leave and join the aevents group");
	check(xfrmsync_handle_set_dispatch_limit(h, 0) == -EINVAL, "a dispatch limit of 0 is refused");
	check(xfrmsync_handle_set_dispatch_limit(h, 16) == 0, "a dispatch limit of 16 is taken");

	/* An update event whose port id is not this handle's: someone else's. */
	memset(&ev, 0, sizeof(ev));
	ev.sa = esp_sa("10.9.0.2", 0x1001);
	ev.flags = ev.cause = XFRMSYNC_CAUSE_UPDATE;
	ev.replay.bmp_len = 1;
	ev.nlmsg_pid = 0;
	check(xfrmsync_caused(h, &ev) == 0, "an update from port 0 is not this handle's");
	xfrmsync_handle_free(h);
}

/* Applied-callback counter for the rules checks. */
static void count_applied(void *user_data, const xfrmsync_sa_id *sa, uint32_t replay, uint32_t timer_ms, int result)
{
	(void)sa, (void)replay, (void)timer_ms, (void)result;
	++*(int *)user_data;
}

/* Rules need no SA until one appears; appending thresholds to a NEWSA being
 * built is pure message work once HZ is known. */
static void rules_and_newsa(void)
{
	union {
		struct nlmsghdr nlh;
		char bytes[512];
	} msg;
	struct xfrm_usersa_info *info = NLMSG_DATA(&msg.nlh);
	struct nlattr *attr;
	xfrmsync_handle *h = NULL;
	xfrmsync_rule rule;
	int applied = 0, rc, len;

	if (!check(xfrmsync_handle_new(&h) == 0, "handle for rules"))
		return;
	memset(&rule, 0, sizeof(rule));
	rule.name = "reqid-7";
	rule.match = XFRMSYNC_MATCH_REQID | XFRMSYNC_MATCH_DST;
	rule.reqid = 7;
	rule.family = AF_INET;
	inet_pton(AF_INET, "10.9.0.0", rule.dst);
	rule.dst_len = 16;
	rule.replay_threshold = 21;
	rule.timer_threshold_ms = 2000;
	check(xfrmsync_on_applied(h, count_applied, &applied) == 0, "applied callback set");
	check(xfrmsync_rule_add(NULL, &rule) == -EINVAL && xfrmsync_rule_add(h, NULL) == -EINVAL, "NULL rule arguments");
	rule.match = 0x8000;
	check(xfrmsync_rule_add(h, &rule) == -EINVAL, "unknown match bits give -EINVAL");
	rule.match = XFRMSYNC_MATCH_DIRECTION;
	rule.direction = 9;
	check(xfrmsync_rule_add(h, &rule) == -EINVAL, "direction 9 gives -EINVAL");
	rule.match = XFRMSYNC_MATCH_REQID | XFRMSYNC_MATCH_DST;
	rule.dst_len = 33;
	check(xfrmsync_rule_add(h, &rule) == -EINVAL, "an IPv4 prefix of 33 bits gives -EINVAL");
	rule.dst_len = 16;
	rc = xfrmsync_rule_add(h, &rule);
	check(rc == 0, "rule added and applied to the SAs there are (none here): %d", rc);
	check(applied == 0, "nothing to apply on a host without SAs");

	memset(&msg, 0, sizeof(msg));
	msg.nlh.nlmsg_len = NLMSG_LENGTH(sizeof(*info));
	msg.nlh.nlmsg_type = XFRM_MSG_NEWSA;
	info->family = AF_INET;
	inet_pton(AF_INET, "10.9.0.2", &info->id.daddr);
	inet_pton(AF_INET, "10.9.0.1", &info->saddr);
	info->id.spi = htonl(0x1001);
	info->id.proto = IPPROTO_ESP;
	info->reqid = 7;
	check(xfrmsync_set_kernel_hz(250) == 0, "HZ 250 declared");
	len = msg.nlh.nlmsg_len;
	check(xfrmsync_newsa_add_thresholds(h, &msg, len + 15) == -ENOSPC && (int)msg.nlh.nlmsg_len == len,
	      "no room for both attributes: -ENOSPC, message unchanged");
	rc = xfrmsync_newsa_add_thresholds(h, &msg, sizeof(msg));
	check(rc == len + 16 && (int)msg.nlh.nlmsg_len == rc, "both attributes appended: %d bytes", rc);
	attr = (struct nlattr *)((char *)&msg + len);
	check(attr[0].nla_type == XFRMA_REPLAY_THRESH && *(uint32_t *)(attr + 1) == 21, "XFRMA_REPLAY_THRESH 21");
	attr = (struct nlattr *)((char *)&msg + len + 8);
	check(attr[0].nla_type == XFRMA_ETIMER_THRESH && *(uint32_t *)(attr + 1) == 500,
	      "XFRMA_ETIMER_THRESH in jiffies: 2000 ms at HZ 250 is 500");
	check(xfrmsync_newsa_add_thresholds(h, &msg, sizeof(msg)) == -EINVAL, "a second append is refused");
	msg.nlh.nlmsg_len = len;
	info->reqid = 8;
	check(xfrmsync_newsa_add_thresholds(h, &msg, sizeof(msg)) == 0 && (int)msg.nlh.nlmsg_len == len,
	      "no rule matches reqid 8: 0, message unchanged");
	msg.nlh.nlmsg_type = XFRM_MSG_NEWAE;
	check(xfrmsync_newsa_add_thresholds(h, &msg, sizeof(msg)) == -EINVAL, "not a NEWSA: -EINVAL");
	check(xfrmsync_rule_remove(h, "reqid-7") == 1 && xfrmsync_rule_remove(h, "reqid-7") == 0,
	      "rule removed once");
	xfrmsync_handle_free(h);
}

static void formatting(void)
{
	xfrmsync_aevent ev;
	char line[1024], small[16];
	int n;

	memset(&ev, 0, sizeof(ev));
	ev.sa = esp_sa("10.9.0.2", 0x1001);
	inet_pton(AF_INET, "10.9.0.1", ev.saddr);
	ev.reqid = 1;
	ev.flags = ev.cause = XFRMSYNC_CAUSE_REPLAY;
	ev.replay.seq = 3;
	ev.replay.bmp_len = 1;
	ev.replay.bmp[0] = 7;
	ev.lifetime.packets = 2;
	ev.lifetime.bytes = 144;
	n = xfrmsync_aevent_format(&ev, false, line, sizeof(line));
	check(n > 0 && (size_t)n == strlen(line), "text line: %s", line);
	check(strstr(line, "replay esp dst 10.9.0.2 spi 0x00001001") == line, "text line starts with cause and SA");
	n = xfrmsync_aevent_format(&ev, true, line, sizeof(line));
	check(n > 0 && line[0] == '{' && line[n - 1] == '}' && strstr(line, "\"spi\":4097"), "JSON line: %s", line);
	n = xfrmsync_aevent_format(&ev, true, small, sizeof(small));
	check(n > (int)sizeof(small) && strlen(small) == sizeof(small) - 1, "cut like snprintf, returns full length %d", n);
	check(xfrmsync_aevent_format(&ev, false, NULL, 0) > 0, "NULL buffer of length 0 measures");
}

/* Sync records (HA): encode, decode back, a batch, and bad bytes refused. */
static void sync_records(void)
{
	xfrmsync_sync_record rec, back;
	uint8_t buf[2 * XFRMSYNC_MAX_SYNC_RECORD];
	int n, m;

	memset(&rec, 0, sizeof(rec));
	rec.sa = esp_sa("10.9.0.2", 0xc0ffee01);
	inet_pton(AF_INET, "10.9.0.1", rec.saddr);
	rec.reqid = 11;
	rec.direction = 2;
	rec.esn = true;
	rec.replay.esn = 1;
	rec.replay.oseq = 0xfffffff0;
	rec.replay.oseq_hi = 1;
	rec.replay.replay_window = 64;
	rec.replay.bmp_len = 2;
	rec.replay.bmp[1] = 0x80000001;
	rec.lifetime_bytes = 1000;
	rec.has_thresholds = true;
	rec.replay_threshold = 32;
	rec.timer_threshold_ms = 2000;
	rec.epoch = 3;
	rec.counter = 7;
	n = xfrmsync_sync_record_encode(&rec, buf, sizeof(buf));
	check(n == 144 + 8, "ESN record of 2 bitmap words encodes in %d bytes", n);
	check(xfrmsync_sync_record_encode(&rec, buf, 10) == -ENOSPC, "no room: -ENOSPC");
	m = xfrmsync_sync_record_encode(&rec, buf + n, sizeof(buf) - n);
	memset(&back, 0x5a, sizeof(back));
	check(xfrmsync_sync_record_decode(buf, n + m, &back) == n, "the first of a batch decodes to its length");
	check(back.sa.spi == 0xc0ffee01 && back.direction == 2 && back.esn && back.replay.oseq_hi == 1 &&
		      back.replay.bmp[1] == 0x80000001 && back.replay.bmp_len == 2 && back.has_thresholds &&
		      back.timer_threshold_ms == 2000 && back.epoch == 3 && back.counter == 7 && back.lifetime_bytes == 1000,
	      "it round-trips");
	buf[0] = 9;
	memset(&back, 0x5a, sizeof(back));
	check(xfrmsync_sync_record_decode(buf, n, &back) == -EBADMSG && back.reqid == 0x5a5a5a5a,
	      "an unknown version: -EBADMSG, out untouched (%s)", xfrmsync_last_error());
	check(xfrmsync_sync_record_decode(buf + n, m - 1, &back) == -EBADMSG, "cut short: -EBADMSG");
	rec.direction = 3;
	check(xfrmsync_sync_record_encode(&rec, buf, sizeof(buf)) == -EINVAL, "direction 3: -EINVAL");
	check(xfrmsync_sync_record_encode(NULL, buf, sizeof(buf)) == -EINVAL &&
		      xfrmsync_sync_record_decode(NULL, 1, &back) == -EINVAL,
	      "NULL arguments: -EINVAL");
}

int main(void)
{
	versions();
	null_arguments();
	with_handle();
	rules_and_newsa();
	formatting();
	sync_records();
	return check_report("c-tests/unit_test");
}

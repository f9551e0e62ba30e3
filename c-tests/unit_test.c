/* C API checks that need no SA: argument validation, versions, the handle's
 * fd, error reporting, formatting. Runs on any Linux host with XFRM netlink,
 * as root, under valgrind or AddressSanitizer. */
#define _GNU_SOURCE /* unshare; clock_gettime, for check.h */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <linux/netlink.h>
#include <linux/xfrm.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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

/* An encoded outbound sync record of SA 10.9.0.2/spi, legacy replay state. */
static int encoded_record(uint8_t *buf, uint32_t spi, uint64_t epoch, uint64_t counter, uint32_t oseq)
{
	xfrmsync_sync_record rec;

	memset(&rec, 0, sizeof(rec));
	rec.sa = esp_sa("10.9.0.2", spi);
	inet_pton(AF_INET, "10.9.0.1", rec.saddr);
	rec.direction = XFRMSYNC_DIR_OUT;
	rec.replay.oseq = oseq;
	rec.replay.bmp_len = 1;
	rec.epoch = epoch;
	rec.counter = counter;
	rec.sent_at_ms = 1;
	return xfrmsync_sync_record_encode(&rec, buf, XFRMSYNC_MAX_SYNC_RECORD);
}

static uint64_t standby_epoch(const xfrmsync_standby *s)
{
	uint64_t epoch = UINT64_MAX;

	xfrmsync_standby_epoch(s, &epoch);
	return epoch;
}

/* HA standby (no kernel): what it holds of the records it is given. */
static void standby_records(void)
{
	uint8_t a[XFRMSYNC_MAX_SYNC_RECORD], b[XFRMSYNC_MAX_SYNC_RECORD], bad[XFRMSYNC_MAX_SYNC_RECORD];
	xfrmsync_standby *s = (xfrmsync_standby *)0x1;
	xfrmsync_sa_id sa = esp_sa("10.9.0.2", 0x2001);
	uint64_t epoch = 7, packets = 0, margin = 0;
	int n, m, rc;

	check(xfrmsync_standby_new(3, NULL) == -EINVAL, "standby_new(epoch, NULL) gives -EINVAL");
	xfrmsync_standby_free(NULL);
	if (!check(xfrmsync_standby_new(3, &s) == 0 && s != NULL && s != (xfrmsync_standby *)0x1, "standby created"))
		return;
	rc = xfrmsync_standby_epoch(s, &epoch);
	check(rc == 0 && epoch == 3, "its epoch is the one given (%llu)", (unsigned long long)epoch);
	check(xfrmsync_standby_count(s) == 0, "it holds nothing yet");

	n = encoded_record(a, 0x2001, 3, 10, 1000);
	rc = xfrmsync_standby_receive(s, a, n);
	check(n > 0 && rc == XFRMSYNC_RECORD_HELD && rc == 0, "an encoded record of epoch 3 is held (%d)", rc);
	check(xfrmsync_standby_count(s) == 1, "count 1");
	check(xfrmsync_standby_receive(s, a, n) == XFRMSYNC_RECORD_OLDER, "the same record again: older");
	m = encoded_record(b, 0x2001, 3, 9, 2000);
	check(xfrmsync_standby_receive(s, b, m) == XFRMSYNC_RECORD_OLDER, "a lower counter: older");
	m = encoded_record(b, 0x2001, 3, 11, 2000);
	check(xfrmsync_standby_receive(s, b, m) == XFRMSYNC_RECORD_HELD, "a higher counter: held");
	m = encoded_record(b, 0x2002, 5, 1, 10);
	check(xfrmsync_standby_receive(s, b, m) == XFRMSYNC_RECORD_HELD && xfrmsync_standby_count(s) == 2,
	      "another SA at epoch 5: held, count 2");
	check(standby_epoch(s) == 5, "a record of a higher epoch raises the standby's (%llu)",
	      (unsigned long long)standby_epoch(s));
	check(xfrmsync_standby_receive(s, a, n) == XFRMSYNC_RECORD_LOWER_EPOCH, "a record of epoch 3 now: lower epoch");
	check(xfrmsync_standby_count(s) == 2 && standby_epoch(s) == 5, "ignored records change nothing");

	/* Malformed: refused, nothing changes. */
	m = encoded_record(bad, 0x2003, 9, 1, 10);
	bad[0] = 9;
	rc = xfrmsync_standby_receive(s, bad, m);
	check(rc == -EBADMSG, "a record of an unknown version: -EBADMSG (%s)", xfrmsync_last_error());
	bad[0] = a[0];
	check(xfrmsync_standby_receive(s, bad, m - 1) == -EBADMSG, "a record cut short: -EBADMSG");
	check(xfrmsync_standby_receive(s, bad, m + 1) == -EBADMSG, "a byte after the record: -EBADMSG");
	check(xfrmsync_standby_receive(s, bad, 0) == -EBADMSG, "no bytes: -EBADMSG");
	check(xfrmsync_standby_count(s) == 2 && standby_epoch(s) == 5,
	      "malformed records change nothing (not even the epoch 9 they carry)");

	/* Lag: a sample of 0x2002 (held at 10) at 310 is 300 behind; with no
	 * rate and no threshold the margin is the default floor, 1024. */
	m = encoded_record(b, 0x2002, 5, 1, 310);
	rc = xfrmsync_standby_lag(s, b, m, NULL, &packets, &margin);
	check(rc == XFRMSYNC_LAG_BEHIND && packets == 300 && margin == 1024, "a sample 300 ahead: %d, %llu behind of %llu",
	      rc, (unsigned long long)packets, (unsigned long long)margin);
	check(xfrmsync_standby_lag(s, b, m, NULL, NULL, NULL) == XFRMSYNC_LAG_BEHIND, "lag without outputs");
	check(xfrmsync_standby_count(s) == 2, "a sample is not held");
	m = encoded_record(b, 0x2009, 5, 1, 310);
	check(xfrmsync_standby_lag(s, b, m, NULL, &packets, &margin) == XFRMSYNC_LAG_NOT_HELD, "a sample of no SA held");
	m = encoded_record(b, 0x2002, 4, 1, 310);
	check(xfrmsync_standby_lag(s, b, m, NULL, &packets, &margin) == XFRMSYNC_LAG_LOWER_EPOCH,
	      "a sample of a lower epoch");
	check(xfrmsync_standby_lag(s, bad, 0, NULL, &packets, &margin) == -EBADMSG, "no bytes: -EBADMSG");
	check(xfrmsync_standby_lag(s, NULL, m, NULL, &packets, &margin) == -EINVAL, "a NULL sample: -EINVAL");
	check(xfrmsync_standby_lag(NULL, b, m, NULL, &packets, &margin) == -EINVAL, "a NULL standby: -EINVAL");

	/* NULL arguments. */
	epoch = 42;
	check(xfrmsync_standby_receive(NULL, a, n) == -EINVAL, "receive(NULL, ...) gives -EINVAL");
	check(xfrmsync_standby_receive(s, NULL, n) == -EINVAL, "receive(s, NULL, len) gives -EINVAL");
	check(xfrmsync_standby_forget(NULL, &sa) == -EINVAL, "forget(NULL, sa) gives -EINVAL");
	check(xfrmsync_standby_forget(s, NULL) == -EINVAL, "forget(s, NULL) gives -EINVAL");
	check(xfrmsync_standby_epoch(NULL, &epoch) == -EINVAL && epoch == 42, "epoch(NULL, out): -EINVAL, out untouched");
	check(xfrmsync_standby_epoch(s, NULL) == -EINVAL, "epoch(s, NULL) gives -EINVAL");
	check(xfrmsync_standby_count(NULL) == -EINVAL, "count(NULL) gives -EINVAL");
	check(xfrmsync_standby_commit(NULL, NULL, NULL, NULL, NULL, NULL) == -EINVAL, "commit(NULL, ...) gives -EINVAL");
	check(xfrmsync_standby_commit(s, NULL, NULL, NULL, NULL, &epoch) == -EINVAL && epoch == 42 &&
		      standby_epoch(s) == 5,
	      "commit without a handle: -EINVAL, nothing changed");
	check(xfrmsync_standby_count(s) == 2, "NULL arguments changed nothing");

	sa.family = 99;
	check(xfrmsync_standby_forget(s, &sa) == -EINVAL, "forget of an SA of family 99: -EINVAL");
	sa = esp_sa("10.9.0.2", 0x2001);
	check(xfrmsync_standby_forget(s, &sa) == 1 && xfrmsync_standby_count(s) == 1, "forget a held SA: 1, count 1");
	check(xfrmsync_standby_forget(s, &sa) == 0 && xfrmsync_standby_count(s) == 1, "forget it again: 0");
	xfrmsync_standby_free(s);
}

struct commit_seen {
	int calls, missing;
	uint32_t spi;
};

static void count_commit(void *user_data, const xfrmsync_sa_commit *c)
{
	struct commit_seen *seen = user_data;

	seen->calls++;
	if (c->outcome == XFRMSYNC_COMMIT_MISSING && c->error == 0 && c->error_message == NULL)
		seen->missing++;
	seen->spi = c->sa.spi;
}

static void ignore_record(void *user_data, const uint8_t *record, size_t len)
{
	(void)user_data, (void)record, (void)len;
}

static void ignore_gone(void *user_data, const xfrmsync_sa_id *sa)
{
	(void)user_data, (void)sa;
}

/* HA with the kernel, in a network namespace of its own (no SA there, and
 * none of the host's is touched): a commit with nothing to write, and the
 * active side's calls. Runs last: the process stays in that namespace. */
static void ha_in_own_netns(void)
{
	uint8_t rec[XFRMSYNC_MAX_SYNC_RECORD];
	xfrmsync_commit_options opts = xfrmsync_commit_options_default();
	struct commit_seen seen = { 0, 0, 0 };
	xfrmsync_standby *s = NULL;
	xfrmsync_handle *h = NULL;
	xfrmsync_active *a = (xfrmsync_active *)0x1;
	uint64_t epoch = 0;
	int rc, fd, due, steps;

	check(opts.detection_ms == 3000 && opts.safety_factor == 2.0 && opts.margin_floor == 1024 &&
		      opts.margin_ceiling == (1u << 30) && opts.inbound == XFRMSYNC_INBOUND_ACCEPT && opts.now_ms == 0,
	      "commit option defaults: 3000 ms, x2, 1024..2^30, accept, now");
	if (!check(unshare(CLONE_NEWNET) == 0, "a network namespace of our own"))
		return;

	if (!check(xfrmsync_standby_new(4, &s) == 0 && xfrmsync_handle_new(&h) == 0, "standby and handle"))
		goto out;
	rc = encoded_record(rec, 0x3001, 4, 1, 10);
	check(xfrmsync_standby_receive(s, rec, rc) == 0, "a record held");
	memset(&opts, 0, sizeof(opts));
	check(xfrmsync_standby_commit(s, h, &opts, count_commit, &seen, &epoch) == -EINVAL && seen.calls == 0 &&
		      epoch == 0 && standby_epoch(s) == 4,
	      "zeroed options (safety factor 0) refused before anything is done");
	opts = xfrmsync_commit_options_default();
	opts.inbound = 7;
	check(xfrmsync_standby_commit(s, h, &opts, count_commit, &seen, &epoch) == -EINVAL, "inbound 7 refused");
	opts.inbound = XFRMSYNC_INBOUND_STRICT;
	rc = xfrmsync_standby_commit(s, h, &opts, count_commit, &seen, &epoch);
	check(rc == 1 && seen.calls == 1 && seen.missing == 1 && seen.spi == 0x3001,
	      "commit where the SA is not installed: reported missing (%d, %s)", rc, rc < 0 ? xfrmsync_last_error() : "");
	check(epoch == 5 && standby_epoch(s) == 5, "the commit starts epoch 5 (%llu)", (unsigned long long)epoch);
	check(xfrmsync_standby_commit(s, h, NULL, NULL, NULL, NULL) == 1 && standby_epoch(s) == 6,
	      "NULL options, callback and epoch: defaults, epoch 6");

	check(xfrmsync_active_new(NULL, 1, 0, 0, 0, NULL) == -EINVAL, "active_new(..., NULL) gives -EINVAL");
	check(xfrmsync_active_new("/nonexistent/netns", 1, 0, 0, 0, &a) == -ENOENT && a == (xfrmsync_active *)0x1,
	      "active_new on a missing netns path: -ENOENT, *out untouched");
	check(xfrmsync_active_fd(NULL) == -EINVAL && xfrmsync_active_next_due_ms(NULL) == -EINVAL &&
		      xfrmsync_active_dispatch(NULL, ignore_record, ignore_gone, NULL) == -EINVAL &&
		      xfrmsync_active_snapshot(NULL) == -EINVAL && xfrmsync_active_learn_epoch(NULL, 1) == -EINVAL &&
		      xfrmsync_active_replaced_by(NULL, &epoch) == -EINVAL &&
		      xfrmsync_active_sample(NULL, 8, ignore_record, NULL) == -EINVAL,
	      "every active call on NULL gives -EINVAL");
	xfrmsync_active_free(NULL);
	if (!check(xfrmsync_active_new(NULL, 5, 64, 500, 5000, &a) == 0, "active side at epoch 5"))
		goto out;
	fd = xfrmsync_active_fd(a);
	check(fd >= 0 && (fcntl(fd, F_GETFL) & O_NONBLOCK) && (fcntl(fd, F_GETFD) & FD_CLOEXEC),
	      "its fd %d is non-blocking and close-on-exec", fd);
	check(xfrmsync_active_next_due_ms(a) == 0, "the first listing is due at once");
	check(xfrmsync_active_dispatch(a, NULL, ignore_gone, NULL) == -EINVAL &&
		      xfrmsync_active_dispatch(a, ignore_record, NULL, NULL) == -EINVAL,
	      "dispatch without a callback gives -EINVAL");
	for (steps = 0, due = 0; steps < 10 && due == 0; steps++) {
		rc = xfrmsync_active_dispatch(a, ignore_record, ignore_gone, NULL);
		if (rc < 0)
			break;
		due = xfrmsync_active_next_due_ms(a);
	}
	check(rc == 0 && due > 0 && due <= 5000, "no SA: nothing handed out, then due within the refresh (%d ms)",
	      due);
	check(xfrmsync_active_sample(a, 8, ignore_record, NULL) == 0, "no SA: no sample");
	check(xfrmsync_active_sample(a, 8, NULL, NULL) == -EINVAL, "sample without a callback gives -EINVAL");
	check(xfrmsync_active_snapshot(a) == 0 && xfrmsync_active_next_due_ms(a) == 0, "a snapshot is due at once");
	epoch = 42;
	check(xfrmsync_active_replaced_by(a, &epoch) == 0 && epoch == 42, "not replaced; epoch untouched");
	check(xfrmsync_active_learn_epoch(a, 4) == 0 && xfrmsync_active_learn_epoch(a, 5) == 0,
	      "a lower or equal epoch does not replace it");
	check(xfrmsync_active_learn_epoch(a, 9) == 1, "epoch 9 replaces it: 1");
	check(xfrmsync_active_learn_epoch(a, 10) == 0, "learning a higher one again: 0");
	rc = xfrmsync_active_replaced_by(a, &epoch);
	check(rc == 1 && epoch == 10 && xfrmsync_active_replaced_by(a, NULL) == 1, "replaced by epoch %llu",
	      (unsigned long long)epoch);
	check(xfrmsync_active_dispatch(a, ignore_record, ignore_gone, NULL) >= 0, "a replaced node still dispatches");
	xfrmsync_active_free(a);
out:
	xfrmsync_handle_free(h);
	xfrmsync_standby_free(s);
}

int main(void)
{
	versions();
	null_arguments();
	with_handle();
	rules_and_newsa();
	formatting();
	sync_records();
	standby_records();
	ha_in_own_netns();
	return check_report("c-tests/unit_test");
}

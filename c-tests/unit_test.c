/* C API checks that need no SA: argument validation, versions, the handle's
 * fd, error reporting, formatting. Runs on any Linux host with XFRM netlink,
 * as root, under valgrind or AddressSanitizer. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "check.h"

static xfrmsync_sa_id sa4(const char *daddr, uint32_t spi)
{
	xfrmsync_sa_id sa;

	memset(&sa, 0, sizeof(sa));
	inet_pton(AF_INET, daddr, sa.daddr);
	sa.family = AF_INET;
	sa.proto = IPPROTO_ESP;
	sa.spi = spi;
	return sa;
}

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
	xfrmsync_sa_id sa = sa4("10.9.0.2", 0x1001);
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
	xfrmsync_sa_id sa = sa4("10.9.0.2", 0xdead);
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
	ev.sa = sa4("10.9.0.2", 0x1001);
	ev.flags = ev.cause = XFRMSYNC_CAUSE_UPDATE;
	ev.replay.bmp_len = 1;
	ev.nlmsg_pid = 0;
	check(xfrmsync_caused(h, &ev) == 0, "an update from port 0 is not this handle's");
	xfrmsync_handle_free(h);
}

static void formatting(void)
{
	xfrmsync_aevent ev;
	char line[1024], small[16];
	int n;

	memset(&ev, 0, sizeof(ev));
	ev.sa = sa4("10.9.0.2", 0x1001);
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

int main(void)
{
	versions();
	null_arguments();
	with_handle();
	formatting();
	return check_report("c-tests/unit_test");
}

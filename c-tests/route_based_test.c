/* Real-kernel checks of the C API on route-based SAs: each with a mark and
 * an if_id, as strongSwan installs them for XFRM interfaces
 * (mark_in/out, if_id_in/out). On Linux before 7081d46d3231 (Debian 11's
 * 5.10) the kernel's room for an aevent omits XFRMA_IF_ID, and a GETAE for
 * both thresholds of such an SA panics it; the library must never send one.
 * Run inside the test VM by vmtest/guest/route-based-suite.sh:
 *
 *   route_based_test NETNS SAS_FILE DADDR MARK MASK IF_ID PACKETS SENDER_NETNS
 *
 * SAS_FILE has a line "SPI ESN WINDOW PORT" for each SA, whose destination
 * is DADDR in NETNS; SENDER_NETNS holds the sending side's SAs and policies. For each SA it sets both thresholds (one NEWAE) and
 * reads them back (xfrmsync_query with thresholds), then measures HZ on one
 * (xfrmsync_calibrate_hz: GETAE, NEWAE, GETAE, NEWAE). With the aevents
 * listener joined all along, it sends PACKETS UDP datagrams through each SA
 * from SENDER_NETNS (a child process: one program start less, which costs
 * seconds on 5.10 under TCG) to sockets bound in NETNS, and checks that each SA announced them with traffic events
 * and that its counters and thresholds read back right. Every update event
 * the setters caused must arrive: they too are built in the room the
 * kernel makes. */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

#define MAX_SAS 128

struct route_sa {
	uint32_t spi, window, port;
	int esn;
	xfrmsync_sa_id id;
	uint32_t replay_threshold, timer_ms;
	int updates, traffic;
	uint64_t last_seq;
};

static struct route_sa sas[MAX_SAS];
static size_t n_sas;
static int strays;

static struct route_sa *find(const xfrmsync_sa_id *id)
{
	size_t i;

	for (i = 0; i < n_sas; i++)
		if (sas[i].spi == id->spi)
			return &sas[i];
	return NULL;
}

static void on_event(void *user_data, const xfrmsync_aevent *ev)
{
	struct route_sa *s = find(&ev->sa);

	(void)user_data;
	if (!s) {
		strays++;
		return;
	}
	if (ev->cause == XFRMSYNC_CAUSE_UPDATE) {
		s->updates++;
	} else {
		s->traffic++;
		s->last_seq = (uint64_t)ev->replay.seq_hi << 32 | ev->replay.seq;
	}
}

/* Dispatches for up to `ms`, or until `done` says so. */
static void pump(xfrmsync_handle *h, int ms, int (*done)(void))
{
	struct pollfd p = { .fd = xfrmsync_handle_fd(h), .events = POLLIN };
	double end = now_ms() + ms;
	int rc;

	while (now_ms() < end && !(done && done())) {
		if (poll(&p, 1, 100) > 0) {
			rc = xfrmsync_dispatch(h);
			if (rc < 0 && rc != -ENOBUFS)
				check(0, "xfrmsync_dispatch: %d", rc);
		}
	}
}

static int traffic_seen(void)
{
	size_t i;

	for (i = 0; i < n_sas; i++)
		if (sas[i].traffic == 0)
			return 0;
	return 1;
}

/* A child process in the namespace at `netns_path` with a UDP socket bound
 * to each SA's port, so that no datagram is answered with an ICMP error
 * (Debian's 7.2.13 panics in inet_getpeer sending one for a datagram that
 * came through an SA with an if_id: see route-based-suite.sh). It keeps
 * them until killed; its pid, or -1. */
static pid_t start_receivers(const char *netns_path)
{
	int ready[2];
	pid_t pid;
	char byte = 0;

	if (pipe(ready) < 0)
		return -1;
	pid = fork();
	if (pid == 0) {
		int ns = open(netns_path, O_RDONLY | O_CLOEXEC);
		size_t i;

		close(ready[0]);
		if (ns < 0 || setns(ns, CLONE_NEWNET) < 0)
			_exit(2);
		for (i = 0; i < n_sas; i++) {
			struct sockaddr_in at = { .sin_family = AF_INET, .sin_port = htons((uint16_t)sas[i].port) };
			int fd = socket(AF_INET, SOCK_DGRAM, 0);

			if (fd < 0 || bind(fd, (struct sockaddr *)&at, sizeof(at)) < 0)
				_exit(3);
		}
		if (write(ready[1], &byte, 1) != 1)
			_exit(4);
		for (;;)
			pause();
	}
	close(ready[1]);
	if (pid > 0 && read(ready[0], &byte, 1) != 1) {
		waitpid(pid, NULL, 0);
		pid = -1;
	}
	close(ready[0]);
	return pid;
}

/* Sends `packets` datagrams to each SA's port from the namespace at
 * `netns_path`, in a child process; 0 when all went out. */
static int send_traffic(const char *netns_path, const char *daddr, uint32_t packets)
{
	pid_t pid = fork();
	int status = 0;

	if (pid < 0)
		return -1;
	if (pid == 0) {
		struct sockaddr_in to = { .sin_family = AF_INET };
		char payload[32] = { 0 };
		int ns = open(netns_path, O_RDONLY | O_CLOEXEC), fd;
		uint32_t round;
		size_t i;

		if (ns < 0 || setns(ns, CLONE_NEWNET) < 0 || inet_pton(AF_INET, daddr, &to.sin_addr) != 1)
			_exit(2);
		fd = socket(AF_INET, SOCK_DGRAM, 0);
		if (fd < 0)
			_exit(3);
		for (round = 0; round < packets; round++) {
			for (i = 0; i < n_sas; i++) {
				to.sin_port = htons((uint16_t)sas[i].port);
				if (sendto(fd, payload, sizeof(payload), 0, (struct sockaddr *)&to, sizeof(to)) !=
				    (ssize_t)sizeof(payload))
					_exit(4);
			}
			usleep(20000);
		}
		_exit(0);
	}
	if (waitpid(pid, &status, 0) != pid)
		return -1;
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static int read_sas(const char *path, const char *daddr, uint32_t mark, uint32_t mask, uint32_t if_id)
{
	FILE *f = fopen(path, "r");
	struct route_sa s;

	if (!f)
		return -1;
	while (n_sas < MAX_SAS &&
	       fscanf(f, "%" SCNi32 " %d %" SCNu32 " %" SCNu32, &s.spi, &s.esn, &s.window, &s.port) == 4) {
		s.id = esp_sa(daddr, s.spi);
		s.id.mark_value = mark;
		s.id.mark_mask = mask;
		s.id.if_id = if_id;
		/* Both thresholds differ from SA to SA, and the timer is a
		 * whole number of the kernel's 100 ms reading steps. */
		s.replay_threshold = 1 + n_sas % 4;
		s.timer_ms = 1000 + 100 * (n_sas % 7);
		s.updates = s.traffic = 0;
		s.last_seq = 0;
		sas[n_sas++] = s;
	}
	fclose(f);
	return (int)n_sas;
}

static const char *form(const struct route_sa *s)
{
	static char name[64];

	snprintf(name, sizeof(name), "0x%x (%s window %u)", s->spi, s->esn ? "ESN" : "no ESN", s->window);
	return name;
}

int main(int argc, char **argv)
{
	xfrmsync_handle *h = NULL;
	xfrmsync_aevent got;
	uint32_t packets, hz = 0;
	size_t i, calibrate_on = 0;
	pid_t receivers;
	int rc, updates_ok = 1, traffic_ok = 1;
	double t0;

	if (argc < 9) {
		fprintf(stderr, "usage: %s NETNS SAS_FILE DADDR MARK MASK IF_ID PACKETS SENDER_NETNS\n", argv[0]);
		return 2;
	}
	packets = (uint32_t)strtoul(argv[7], NULL, 0);
	if (read_sas(argv[2], argv[3], (uint32_t)strtoul(argv[4], NULL, 0), (uint32_t)strtoul(argv[5], NULL, 0),
		     (uint32_t)strtoul(argv[6], NULL, 0)) <= 0) {
		fprintf(stderr, "%s: no SAs in %s\n", argv[0], argv[2]);
		return 2;
	}
	if (!check(xfrmsync_handle_new_netns_path(argv[1], &h) == 0, "handle in %s", argv[1]))
		return check_report("route-based C API");
	check(xfrmsync_on_event(h, on_event, NULL) == 0, "event callback");
	check(xfrmsync_handle_subscribe(h, true) == 0, "aevents listener joined");

	/* Set (NEWAE, and an update event each) and read back. */
	for (i = 0; i < n_sas; i++) {
		struct route_sa *s = &sas[i];

		rc = xfrmsync_set_thresholds(h, &s->id, s->replay_threshold, s->timer_ms);
		check(rc == 0, "NEWAE sets %s to %u packets / %u ms", form(s), s->replay_threshold, s->timer_ms);
		memset(&got, 0, sizeof(got));
		rc = xfrmsync_query(h, &s->id, XFRMSYNC_QUERY_THRESHOLDS, &got);
		check(rc == 0 && got.replay_threshold == s->replay_threshold && got.timer_threshold_ms == s->timer_ms &&
			      (got.present & (XFRMSYNC_HAS_REPLAY_THRESHOLD | XFRMSYNC_HAS_TIMER_THRESHOLD)) ==
				      (XFRMSYNC_HAS_REPLAY_THRESHOLD | XFRMSYNC_HAS_TIMER_THRESHOLD) &&
			      got.replay.esn == (uint32_t)(s->esn || s->window > 32) && got.sa.mark_value == s->id.mark_value,
		      "query with thresholds on %s: rc %d, %u packets / %u ms, %s replay state", form(s), rc,
		      got.replay_threshold, got.timer_threshold_ms, got.replay.esn ? "ESN-format" : "legacy");
		if (s->esn && s->window == 256)
			calibrate_on = i; /* the window that panics 5.10.0-32 */
	}
	/* Measuring HZ reads the timer before and after its probe: on the SA
	 * whose window panics 5.10 when both thresholds are asked for. */
	rc = xfrmsync_calibrate_hz(h, &sas[calibrate_on].id, &hz);
	check(rc == 0 && hz >= 100 && hz <= 1000, "HZ measured on %s: %u (rc %d)", form(&sas[calibrate_on]), hz, rc);
	memset(&got, 0, sizeof(got));
	rc = xfrmsync_query(h, &sas[calibrate_on].id, XFRMSYNC_QUERY_THRESHOLDS, &got);
	check(rc == 0 && got.timer_threshold_ms == sas[calibrate_on].timer_ms, "its timer restored: %u ms",
	      got.timer_threshold_ms);
	pump(h, 1500, NULL);
	for (i = 0; i < n_sas; i++) {
		int want = i == calibrate_on ? 3 : 1; /* calibration: probe and restore */

		if (sas[i].updates < want) {
			updates_ok = 0;
			printf("# %s: %d update events, expected at least %d\n", form(&sas[i]), sas[i].updates, want);
		}
	}
	check(updates_ok, "every NEWAE's update event arrived (%zu SAs)", n_sas);

	/* Traffic, with the listener joined. */
	receivers = start_receivers(argv[1]);
	check(receivers > 0, "a UDP socket on each SA's port in %s", argv[1]);
	t0 = now_ms();
	rc = send_traffic(argv[8], argv[3], packets);
	check(rc == 0, "traffic from %s: %u datagrams to each SA's port (status %d, %.0f ms)", argv[8], packets, rc,
	      now_ms() - t0);
	pump(h, 8000, traffic_seen);
	if (receivers > 0) {
		kill(receivers, SIGKILL);
		waitpid(receivers, NULL, 0);
	}
	for (i = 0; i < n_sas; i++) {
		struct route_sa *s = &sas[i];

		memset(&got, 0, sizeof(got));
		rc = xfrmsync_query(h, &s->id, XFRMSYNC_QUERY_THRESHOLDS, &got);
		if (s->traffic == 0 || rc != 0 || got.replay.seq != packets || got.lifetime.packets != packets ||
		    got.replay_threshold != s->replay_threshold || got.timer_threshold_ms != s->timer_ms) {
			traffic_ok = 0;
			printf("# %s: %d traffic events (last seq %" PRIu64 "), query rc %d: seq %u, %" PRIu64
			       " packets, %u packets / %u ms\n",
			       form(s), s->traffic, s->last_seq, rc, got.replay.seq, (uint64_t)got.lifetime.packets,
			       got.replay_threshold, got.timer_threshold_ms);
		}
	}
	check(traffic_ok, "every SA announced its %u packets with traffic events and reads them back, thresholds kept",
	      packets);
	check(strays == 0, "no event about another SA (%d)", strays);
	{
		int traffic = 0, updates = 0;
		size_t announced = 0;

		for (i = 0; i < n_sas; i++) {
			traffic += sas[i].traffic;
			updates += sas[i].updates;
			announced += sas[i].traffic > 0;
		}
		printf("fact: route_based.events: %s: %d traffic events, from %zu of %zu SAs; %d update events\n",
		       traffic_ok && updates_ok ? "survived" : "FAILED", traffic, announced, n_sas, updates);
	}
	xfrmsync_handle_free(h);
	return check_report("route-based C API");
}

/* A rule applier on the C API: adds threshold rules to a handle of the
 * caller's network namespace (xfrmsync_rule_add: every SA there now gets
 * them) and dispatches its events, so every SA the kernel adds later gets
 * them too, until SIGTERM/SIGINT or --seconds. It stands in for
 * `xfrmsync apply` in the guest suites (racoon's PF_KEY path, and charon
 * without the plugin).
 *
 *   rule_apply [--seconds N] RULE...
 *   RULE = NAME:KEY=VALUE[,KEY=VALUE...]
 *   KEY  = reqid | src | dst (ADDR[/LEN]) | spi | proto (esp|ah|NUMBER)
 *          | replay (packets) | timer (ms)
 *
 * Prints "ready" once every rule is added (and applied to the SAs there
 * were), then one line per application, with the rule that gave it
 * (xfrmsync_on_applied_rule):
 *   applied spi=0x... dst=... replay=N timer=N result=0|-errno rule=NAME
 * It polls with xfrmsync_relist_due_ms() as the timeout, so an owed listing
 * of every SA is retried even when no event comes.
 * Exits 0 on a signal or at the end of --seconds, 1 on an error. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <xfrmsync.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static void usage(void)
{
	fprintf(stderr, "usage: rule_apply [--seconds N] NAME:KEY=VALUE[,KEY=VALUE...]...\n"
			"  KEY: reqid src dst spi proto replay timer\n");
	exit(2);
}

static int parse_prefix(const char *text, xfrmsync_rule *rule, uint8_t *addr, uint8_t *len)
{
	char buf[INET6_ADDRSTRLEN + 8], *slash;
	uint16_t family;
	int max;

	snprintf(buf, sizeof(buf), "%s", text);
	slash = strchr(buf, '/');
	if (slash)
		*slash++ = '\0';
	family = strchr(buf, ':') ? AF_INET6 : AF_INET;
	max = family == AF_INET6 ? 128 : 32;
	if (inet_pton(family, buf, addr) != 1)
		return -1;
	*len = slash ? (uint8_t)atoi(slash) : (uint8_t)max;
	if (*len > max || (rule->family && rule->family != family))
		return -1;
	rule->family = family;
	return 0;
}

static void parse_rule(char *arg, xfrmsync_rule *rule)
{
	char *colon = strchr(arg, ':'), *kv, *save = NULL;
	int have_replay = 0, have_timer = 0;

	memset(rule, 0, sizeof(*rule));
	if (!colon || colon == arg)
		usage();
	*colon = '\0';
	rule->name = arg;
	for (kv = strtok_r(colon + 1, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(kv, '='), *val;

		if (!eq)
			usage();
		*eq = '\0';
		val = eq + 1;
		if (!strcmp(kv, "reqid")) {
			rule->match |= XFRMSYNC_MATCH_REQID;
			rule->reqid = strtoul(val, NULL, 0);
		} else if (!strcmp(kv, "src")) {
			rule->match |= XFRMSYNC_MATCH_SRC;
			if (parse_prefix(val, rule, rule->src, &rule->src_len) < 0)
				usage();
		} else if (!strcmp(kv, "dst")) {
			rule->match |= XFRMSYNC_MATCH_DST;
			if (parse_prefix(val, rule, rule->dst, &rule->dst_len) < 0)
				usage();
		} else if (!strcmp(kv, "spi")) {
			rule->match |= XFRMSYNC_MATCH_SPI;
			rule->spi = strtoul(val, NULL, 0);
		} else if (!strcmp(kv, "proto")) {
			rule->match |= XFRMSYNC_MATCH_PROTO;
			rule->proto = !strcmp(val, "esp") ? IPPROTO_ESP :
				      !strcmp(val, "ah") ? IPPROTO_AH : (uint8_t)atoi(val);
		} else if (!strcmp(kv, "replay")) {
			rule->replay_threshold = strtoul(val, NULL, 0);
			have_replay = 1;
		} else if (!strcmp(kv, "timer")) {
			rule->timer_threshold_ms = strtoul(val, NULL, 0);
			have_timer = 1;
		} else {
			usage();
		}
	}
	if (!have_replay || !have_timer)
		usage();
}

static void on_applied(void *user_data, const xfrmsync_sa_id *sa, uint32_t replay, uint32_t timer_ms,
		       int result, const char *rule)
{
	char dst[INET6_ADDRSTRLEN] = "?";

	(void)user_data;
	inet_ntop(sa->family, sa->daddr, dst, sizeof(dst));
	printf("applied spi=0x%08x dst=%s replay=%u timer=%u result=%d rule=%s\n", sa->spi, dst, replay, timer_ms,
	       result, rule ? rule : "(registered)");
}

int main(int argc, char **argv)
{
	xfrmsync_handle *h;
	struct sigaction sa;
	struct timespec start, now;
	double seconds = 0;
	int i = 1, rc;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc > 2 && !strcmp(argv[1], "--seconds")) {
		seconds = atof(argv[2]);
		i = 3;
	}
	if (i >= argc)
		usage();
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	if (xfrmsync_handle_new(&h) < 0) {
		fprintf(stderr, "rule_apply: %s\n", xfrmsync_last_error());
		return 1;
	}
	xfrmsync_on_applied_rule(h, on_applied, NULL);
	/* As `xfrmsync apply` does: learn HZ before the first SA needs it, so
	 * that no SA waits for the probe. */
	{
		uint32_t hz = 0;
		int source = xfrmsync_learn_kernel_hz(&hz);

		if (source < 0)
			printf("kernel HZ unknown (%s)\n", xfrmsync_last_error());
		else
			printf("kernel HZ %u (source %d)\n", hz, source);
	}
	for (; i < argc; i++) {
		xfrmsync_rule rule;

		parse_rule(argv[i], &rule);
		if (xfrmsync_rule_add(h, &rule) < 0) {
			fprintf(stderr, "rule_apply: rule %s: %s\n", rule.name, xfrmsync_last_error());
			return 1;
		}
	}
	printf("ready\n");
	clock_gettime(CLOCK_MONOTONIC, &start);
	while (!stop) {
		struct pollfd pfd = { .fd = xfrmsync_handle_fd(h), .events = POLLIN };
		int due = xfrmsync_relist_due_ms(h);

		if (seconds > 0) {
			clock_gettime(CLOCK_MONOTONIC, &now);
			if (now.tv_sec - start.tv_sec + (now.tv_nsec - start.tv_nsec) / 1e9 >= seconds)
				break;
		}
		if (poll(&pfd, 1, due >= 0 && due < 200 ? due : 200) < 0) {
			if (errno == EINTR)
				continue;
			perror("rule_apply: poll");
			return 1;
		}
		if (!(pfd.revents & POLLIN) && due != 0)
			continue;
		rc = xfrmsync_dispatch(h);
		if (rc == -ENOBUFS)
			printf("lost events: every SA is listed again, a step per dispatch\n");
		else if (rc < 0) {
			fprintf(stderr, "rule_apply: dispatch: %s\n", xfrmsync_last_error());
			return 1;
		}
	}
	xfrmsync_handle_free(h);
	return 0;
}

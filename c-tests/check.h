/* Minimal test reporting shared by the C tests: one line per check, and the
 * closing "N passed, N failed" line that test runners read; and the small
 * helpers every test needs. */
#ifndef XFRMSYNC_C_TESTS_CHECK_H
#define XFRMSYNC_C_TESTS_CHECK_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <xfrmsync.h>

static int checks_passed, checks_failed;

__attribute__((format(printf, 2, 3)))
static int check(int ok, const char *fmt, ...)
{
	va_list ap;

	printf("%s - ", ok ? "ok" : "not ok");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	if (!ok)
		printf("  [last error: %s]", xfrmsync_last_error());
	printf("\n");
	fflush(stdout);
	if (ok)
		checks_passed++;
	else
		checks_failed++;
	return ok;
}

static int check_report(const char *suite)
{
	printf("%s: %d passed, %d failed\n", suite, checks_passed, checks_failed);
	return checks_failed == 0 && checks_passed > 0 ? 0 : 1;
}

/* An ESP SA's identity; the family follows the address. */
static inline xfrmsync_sa_id esp_sa(const char *daddr, uint32_t spi)
{
	xfrmsync_sa_id sa;

	memset(&sa, 0, sizeof(sa));
	sa.family = strchr(daddr, ':') ? AF_INET6 : AF_INET;
	inet_pton(sa.family, daddr, sa.daddr);
	sa.proto = IPPROTO_ESP;
	sa.spi = spi;
	return sa;
}

static inline double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

#endif

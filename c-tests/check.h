/* Minimal test reporting shared by the C tests: one line per check, and the
 * closing "N passed, N failed" line that test runners read. */
#ifndef XFRMSYNC_C_TESTS_CHECK_H
#define XFRMSYNC_C_TESTS_CHECK_H

#include <stdarg.h>
#include <stdio.h>

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

#endif

/*
 * time-floor: what the VM itself does to the timing of a short section
 * (issue 14's control for the plugin's hook times).
 *
 *   time-floor US [US ...]      until SIGTERM or SIGINT, then prints
 *
 * The thread sleeps 0.2 to 2 ms (as a charon worker waits for the next IKE
 * message), wakes, and times one section of pure computation (no lock, no
 * allocation, no system call, no memory beyond registers) calibrated to US
 * microseconds of this thread's CPU, the sizes taken in turn. Each section
 * is timed as the plugin times a hook: CLOCK_MONOTONIC and
 * CLOCK_THREAD_CPUTIME_ID read before and after, counted in 1 us buckets.
 * Whatever a section takes beyond its size is the VM's: preemption, other
 * vCPUs, interrupts, the emulator. Prints one line per size:
 *
 *   time-floor: section of 30 us (41000 iterations): 12000 calls; clock:
 *   p50 < 31 us, p99 < 70 us, max 900 us; CPU: p50 < ..., max ... us
 */

#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define BUCKETS 4096
#define MAX_SIZES 8

typedef struct {
	unsigned times[BUCKETS + 1];
	unsigned cpu_times[BUCKETS + 1];
	uint64_t max_ns, cpu_max_ns, calls, iterations;
	long us;
} section_t;

static volatile sig_atomic_t stop;
static volatile uint64_t sink;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static uint64_t ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* registers only: the section touches no memory that could fault */
static uint64_t work(uint64_t iterations, uint64_t x)
{
	uint64_t i;

	for (i = 0; i < iterations; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
	}
	return x;
}

static void count(unsigned *times, uint64_t *max, uint64_t ns)
{
	uint64_t us = ns / 1000;

	times[us < BUCKETS ? us : BUCKETS]++;
	if (ns > *max)
		*max = ns;
}

static unsigned percentile(const unsigned *times, uint64_t calls,
			   unsigned permille)
{
	uint64_t seen = 0, wanted = (calls * permille + 999) / 1000;
	unsigned bucket;

	for (bucket = 0; bucket <= BUCKETS; bucket++) {
		seen += times[bucket];
		if (seen >= wanted)
			break;
	}
	return bucket + 1;
}

int main(int argc, char **argv)
{
	static section_t sections[MAX_SIZES];
	struct timespec nap;
	uint64_t best = UINT64_MAX, t0, c0, wall, cpu;
	int sizes = argc - 1, i, turn = 0;

	if (sizes < 1 || sizes > MAX_SIZES) {
		fprintf(stderr, "usage: time-floor US [US ...] (at most %d sizes), "
			"until SIGTERM or SIGINT\n", MAX_SIZES);
		return 2;
	}
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	/* calibrated on the thread's CPU clock, the fastest of five runs */
	for (i = 0; i < 5; i++) {
		c0 = ns(CLOCK_THREAD_CPUTIME_ID);
		sink = work(1000000, sink + 1);
		cpu = ns(CLOCK_THREAD_CPUTIME_ID) - c0;
		if (cpu < best)
			best = cpu;
	}
	for (i = 0; i < sizes; i++) {
		sections[i].us = strtol(argv[i + 1], NULL, 10);
		sections[i].iterations = sections[i].us * 1000ULL * 1000000 / best;
	}
	srand(1);
	while (!stop) {
		nap.tv_sec = 0;
		nap.tv_nsec = 200000 + rand() % 1800000;
		nanosleep(&nap, NULL);
		section_t *s = &sections[turn++ % sizes];
		t0 = ns(CLOCK_MONOTONIC);
		c0 = ns(CLOCK_THREAD_CPUTIME_ID);
		sink = work(s->iterations, sink + 1);
		cpu = ns(CLOCK_THREAD_CPUTIME_ID) - c0;
		wall = ns(CLOCK_MONOTONIC) - t0;
		count(s->times, &s->max_ns, wall);
		count(s->cpu_times, &s->cpu_max_ns, cpu);
		s->calls++;
	}
	for (i = 0; i < sizes; i++) {
		section_t *s = &sections[i];

		if (!s->calls)
			continue;
		printf("time-floor: section of %ld us (%llu iterations): %llu calls; "
		       "clock: p50 < %u us, p99 < %u us, max %llu us; CPU: p50 < %u "
		       "us, p99 < %u us, max %llu us\n", s->us,
		       (unsigned long long)s->iterations,
		       (unsigned long long)s->calls,
		       percentile(s->times, s->calls, 500),
		       percentile(s->times, s->calls, 990),
		       (unsigned long long)(s->max_ns + 999) / 1000,
		       percentile(s->cpu_times, s->calls, 500),
		       percentile(s->cpu_times, s->calls, 990),
		       (unsigned long long)(s->cpu_max_ns + 999) / 1000);
	}
	return 0;
}

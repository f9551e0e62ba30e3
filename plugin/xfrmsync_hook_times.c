/*
 * The xfrmsync plugin's hook timing (see xfrmsync_hook_times.h).
 */

#include "xfrmsync_hook_times.h"

#include <sys/resource.h>

#include <library.h>
#include <utils/debug.h>

/** 1 us buckets up to this, then one bucket for the rest */
#define HOOK_BUCKETS 4096

static const char *hook_names[] = {
	"message", "ike_state_change", "child_state_change(INSTALLING)",
	"child_state_change(UPDATING)", "child_state_change(INSTALLED)",
	"child_state_change(DESTROYING)", "child_updown", "child_rekey",
	"all hooks",
};

/**
 * Time spent in hooks, on the clock and on the CPU (without the time the
 * thread was preempted or waited for a lock): counts per microsecond, the
 * longest, in ns
 */
typedef struct {
	u_int times[HOOK_BUCKETS + 1];
	uint64_t max_ns;
	u_int cpu_times[HOOK_BUCKETS + 1];
	uint64_t cpu_max_ns;
	uint64_t calls;
	/** with switches: hooks that waited, hooks preempted, and the clock of
	 * those with neither */
	uint64_t blocked;
	uint64_t preempted;
	u_int quiet_times[HOOK_BUCKETS + 1];
	uint64_t quiet_max_ns;
	uint64_t quiet_calls;
} hook_stats_t;

struct xfrmsync_hook_times_t {
	/** by kind, then all hooks together */
	hook_stats_t hooks[HOOK_KINDS + 1];
	/** context switches are counted */
	bool switches;
};

static void switches_now(long switches[2])
{
	struct rusage usage;

	getrusage(RUSAGE_THREAD, &usage);
	switches[0] = usage.ru_nvcsw;
	switches[1] = usage.ru_nivcsw;
}

void hook_start(xfrmsync_hook_times_t *times, hook_clock_t *start)
{
	if (times->switches)
	{
		switches_now(start->switches);
	}
	clock_gettime(CLOCK_MONOTONIC, &start->wall);
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &start->cpu);
}

static uint64_t ns_since(clockid_t clock, struct timespec *start)
{
	struct timespec end;

	clock_gettime(clock, &end);
	return (end.tv_sec - start->tv_sec) * 1000000000ULL + end.tv_nsec -
		   start->tv_nsec;
}

static void count_time(u_int *times, uint64_t *max_ns, uint64_t ns)
{
	uint64_t max;
	u_int bucket = ns / 1000 < HOOK_BUCKETS ? ns / 1000 : HOOK_BUCKETS;

	__atomic_add_fetch(&times[bucket], 1, __ATOMIC_RELAXED);
	max = __atomic_load_n(max_ns, __ATOMIC_RELAXED);
	while (ns > max && !__atomic_compare_exchange_n(max_ns, &max, ns, FALSE,
							__ATOMIC_RELAXED, __ATOMIC_RELAXED))
	{
	}
}

/**
 * Counts the time a hook took since start, for its kind and for all
 */
void hook_times_done(xfrmsync_hook_times_t *times, int kind,
					 hook_clock_t *start)
{
	uint64_t cpu = ns_since(CLOCK_THREAD_CPUTIME_ID, &start->cpu);
	uint64_t wall = ns_since(CLOCK_MONOTONIC, &start->wall);
	hook_stats_t *stats[] = { &times->hooks[kind], &times->hooks[HOOK_KINDS] };
	long switches[2];
	bool blocked = FALSE, preempted = FALSE;
	int i;

	if (times->switches)
	{
		switches_now(switches);
		blocked = switches[0] != start->switches[0];
		preempted = switches[1] != start->switches[1];
	}
	for (i = 0; i < countof(stats); i++)
	{
		if (blocked)
		{
			__atomic_add_fetch(&stats[i]->blocked, 1, __ATOMIC_RELAXED);
		}
		if (preempted)
		{
			__atomic_add_fetch(&stats[i]->preempted, 1, __ATOMIC_RELAXED);
		}
		if (times->switches && !blocked && !preempted)
		{
			count_time(stats[i]->quiet_times, &stats[i]->quiet_max_ns, wall);
			__atomic_add_fetch(&stats[i]->quiet_calls, 1, __ATOMIC_RELAXED);
		}
		count_time(stats[i]->times, &stats[i]->max_ns, wall);
		count_time(stats[i]->cpu_times, &stats[i]->cpu_max_ns, cpu);
		__atomic_add_fetch(&stats[i]->calls, 1, __ATOMIC_RELAXED);
	}
}

/**
 * The microsecond below which a share of the calls took their time
 */
static u_int hook_percentile(u_int *times, uint64_t calls, u_int permille)
{
	uint64_t seen = 0, wanted = (calls * permille + 999) / 1000;
	u_int bucket;

	for (bucket = 0; bucket <= HOOK_BUCKETS; bucket++)
	{
		seen += __atomic_load_n(&times[bucket], __ATOMIC_RELAXED);
		if (seen >= wanted)
		{
			break;
		}
	}
	return bucket + 1;
}

/**
 * Logs how many hooks of a kind waited or were preempted, and the clock of
 * the others
 */
static void log_switches(hook_stats_t *stats, const char *when, int kind)
{
	uint64_t quiet = __atomic_load_n(&stats->quiet_calls, __ATOMIC_RELAXED);

	DBG1(DBG_KNL, "xfrmsync: hook switches (%s), %s: %llu waited (a voluntary "
		 "context switch), %llu preempted; the %llu with neither: clock p50 "
		 "< %u us, p99 < %u us, max %llu us", when, hook_names[kind],
		 (unsigned long long)__atomic_load_n(&stats->blocked,
											 __ATOMIC_RELAXED),
		 (unsigned long long)__atomic_load_n(&stats->preempted,
											 __ATOMIC_RELAXED),
		 (unsigned long long)quiet,
		 quiet ? hook_percentile(stats->quiet_times, quiet, 500) : 0,
		 quiet ? hook_percentile(stats->quiet_times, quiet, 990) : 0,
		 (unsigned long long)(__atomic_load_n(&stats->quiet_max_ns,
											  __ATOMIC_RELAXED) + 999) / 1000);
}

/**
 * Logs the hook times so far (level 1: operators and the tests read it)
 */
void hook_times_log(xfrmsync_hook_times_t *times, const char *when)
{
	hook_stats_t *stats;
	uint64_t calls;
	int kind;

	for (kind = HOOK_KINDS; kind >= 0; kind--)
	{
		stats = &times->hooks[kind];
		calls = __atomic_load_n(&stats->calls, __ATOMIC_RELAXED);
		if (!calls)
		{
			continue;
		}
		DBG1(DBG_KNL, "xfrmsync: hook times (%s), %s: %llu calls; clock: p50 "
			 "< %u us, p99 < %u us, max %llu us; CPU: p50 < %u us, p99 < %u us, "
			 "max %llu us", when, hook_names[kind], (unsigned long long)calls,
			 hook_percentile(stats->times, calls, 500),
			 hook_percentile(stats->times, calls, 990),
			 (unsigned long long)(__atomic_load_n(&stats->max_ns,
											__ATOMIC_RELAXED) + 999) / 1000,
			 hook_percentile(stats->cpu_times, calls, 500),
			 hook_percentile(stats->cpu_times, calls, 990),
			 (unsigned long long)(__atomic_load_n(&stats->cpu_max_ns,
											__ATOMIC_RELAXED) + 999) / 1000);
		if (times->switches)
		{
			log_switches(stats, when, kind);
		}
	}
}

xfrmsync_hook_times_t *hook_times_create(bool switches)
{
	xfrmsync_hook_times_t *times;

	INIT(times,
		.switches = switches,
	);
	return times;
}

void hook_times_destroy(xfrmsync_hook_times_t *times)
{
	free(times);
}

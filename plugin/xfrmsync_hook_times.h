/*
 * The xfrmsync plugin's hook timing.
 */

/**
 * @defgroup xfrmsync_hook_times xfrmsync_hook_times
 * @{ @ingroup xfrmsync
 *
 * How long the plugin's bus hooks take: charon holds its bus lock around
 * each, so this is what every IKE message waits for. Each hook is timed on
 * the clock and on the thread's CPU clock (which leaves out the time the
 * thread was preempted or slept on a lock); p50, p99 and the longest are
 * logged at level 1, per hook and for all of them.
 */

#ifndef XFRMSYNC_HOOK_TIMES_H_
#define XFRMSYNC_HOOK_TIMES_H_

#include <time.h>

#include <library.h>

/** The hooks timed, each on its own */
enum {
	HOOK_MESSAGE,
	HOOK_IKE_STATE,
	HOOK_CHILD_INSTALLING,
	HOOK_CHILD_UPDATING,
	HOOK_CHILD_INSTALLED,
	HOOK_CHILD_DESTROYING,
	HOOK_CHILD_UPDOWN,
	HOOK_CHILD_REKEY,
	HOOK_KINDS,
};

/** When a hook began, on both clocks */
typedef struct {
	struct timespec wall;
	struct timespec cpu;
	/** the thread's voluntary and involuntary context switches so far,
	 * when they are counted */
	long switches[2];
} hook_clock_t;

typedef struct xfrmsync_hook_times_t xfrmsync_hook_times_t;

/**
 * Notes when a hook begins.
 */
void hook_start(xfrmsync_hook_times_t *times, hook_clock_t *start);

/**
 * Counts the time a hook of this kind took since start. Lock-free: any
 * thread, any number at once.
 */
void hook_times_done(xfrmsync_hook_times_t *times, int kind,
					 hook_clock_t *start);

/**
 * Logs the figures so far, at level 1.
 */
void hook_times_log(xfrmsync_hook_times_t *times, const char *when);

/**
 * With switches, each hook also counts its thread's context switches
 * (getrusage, two system calls a hook): a voluntary one means the hook
 * waited (a lock, I/O), an involuntary one that the scheduler preempted it;
 * the times of the hooks with neither are logged apart.
 */
xfrmsync_hook_times_t *hook_times_create(bool switches);

void hook_times_destroy(xfrmsync_hook_times_t *times);

#endif /** XFRMSYNC_HOOK_TIMES_H_ @}*/

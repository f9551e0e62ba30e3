/* HA sync through the C API, both nodes in one process for a demonstration:
 * the active side in one network namespace, the standby's commit in
 * another.
 *
 *   ha_sync ACTIVE_NETNS STANDBY_NETNS SECONDS
 *
 * e.g. ha_sync /run/netns/a /run/netns/b 5. For SECONDS the active side
 * turns the kernel's events about every SA of ACTIVE_NETNS into encoded
 * sync records; each is handed to the standby object, as a real product
 * would do after sending it over its own link. Then the standby takes over:
 * it commits the records into the SAs of the same identity installed in
 * STANDBY_NETNS (the HA product installed them there, with their keys),
 * prints one line per SA and the new epoch, and tells the old active side
 * of that epoch, which stops it for good. Before the commit the standby
 * measures its replication lag: the active side samples every SA's state
 * in its kernel, and the standby compares each sample with its record and
 * with the margin a takeover would add.
 *
 * Exits 0 only if no SA failed: one the kernel refused (failed), or whose
 * record does not fit it (mismatch). An SA that needs a rekey, or that is
 * not installed in STANDBY_NETNS (missing), is reported but is not a
 * failure of the commit. Needs CAP_NET_ADMIN and CAP_SYS_ADMIN.
 *
 * Build like any user of the library:
 *   cc ha_sync.c $(pkg-config --cflags --libs xfrmsync) -o ha_sync */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <xfrmsync.h>

struct link {
	xfrmsync_standby *standby;
	unsigned long records, held, ignored, refused, gone;
};

/* The standby's lag, sample by sample. */
struct lag {
	xfrmsync_standby *standby;
	unsigned long sampled, compared, over_margin, failed;
	uint64_t greatest, greatest_margin;
};

struct tally {
	unsigned long written, rekey, missing, failed;
};

/* The active side's record: here it reaches the standby at once; a product
 * sends the bytes over its link and the standby's end calls the same. */
static void send_record(void *user_data, const uint8_t *record, size_t len)
{
	struct link *link = user_data;
	int rc = xfrmsync_standby_receive(link->standby, record, len);

	link->records++;
	if (rc == XFRMSYNC_RECORD_HELD)
		link->held++;
	else if (rc > 0)
		link->ignored++;
	else {
		link->refused++;
		fprintf(stderr, "ha_sync: standby refused a record: %s\n", xfrmsync_last_error());
	}
}

static void send_gone(void *user_data, const xfrmsync_sa_id *sa)
{
	struct link *link = user_data;

	link->gone++;
	xfrmsync_standby_forget(link->standby, sa);
}

/* A sample of the active side's kernel: a product sends it over its link
 * apart from records, and the standby's end compares it, never holds it. */
static void compare_sample(void *user_data, const uint8_t *sample, size_t len)
{
	struct lag *lag = user_data;
	uint64_t packets = 0, margin = 0;
	int rc = xfrmsync_standby_lag(lag->standby, sample, len, NULL, &packets, &margin);

	lag->sampled++;
	if (rc < 0) {
		lag->failed++;
		fprintf(stderr, "ha_sync: standby refused a sample: %s\n", xfrmsync_last_error());
	} else if (rc == XFRMSYNC_LAG_BEHIND) {
		lag->compared++;
		lag->over_margin += packets > margin;
		if (packets >= lag->greatest) {
			lag->greatest = packets;
			lag->greatest_margin = margin;
		}
	}
}

static void format_sa(const xfrmsync_sa_id *sa, char *out, size_t len)
{
	char addr[INET6_ADDRSTRLEN] = "?";
	const char *proto = sa->proto == 50 ? "esp" : sa->proto == 51 ? "ah" : sa->proto == 108 ? "comp" : "proto?";
	int n;

	inet_ntop(sa->family, sa->daddr, addr, sizeof(addr));
	n = snprintf(out, len, "%s dst %s spi 0x%08x", proto, addr, sa->spi);
	if (n > 0 && (size_t)n < len && (sa->mark_value || sa->mark_mask))
		n += snprintf(out + n, len - n, " mark 0x%x/0x%x", sa->mark_value, sa->mark_mask);
	if (n > 0 && (size_t)n < len && sa->if_id)
		snprintf(out + n, len - n, " if_id %u", sa->if_id);
}

static const char *direction_name(uint32_t direction)
{
	return direction == XFRMSYNC_DIR_IN ? "in" : direction == XFRMSYNC_DIR_OUT ? "out" : "?";
}

static const char *mismatch_name(uint32_t mismatch)
{
	switch (mismatch) {
	case XFRMSYNC_MISMATCH_OTHER_SA:
		return "other-sa";
	case XFRMSYNC_MISMATCH_REPLAY_FORM:
		return "replay-form";
	case XFRMSYNC_MISMATCH_NO_DIRECTION:
		return "no-direction";
	}
	return "?";
}

static void print_commit(void *user_data, const xfrmsync_sa_commit *c)
{
	struct tally *tally = user_data;
	char sa[128];

	format_sa(&c->sa, sa, sizeof(sa));
	switch (c->outcome) {
	case XFRMSYNC_COMMIT_WRITTEN:
		tally->written++;
		printf("%s %s written synced %llu local %llu written %llu margin %llu age %llu ms\n", sa,
		       direction_name(c->direction), (unsigned long long)c->synced, (unsigned long long)c->local,
		       (unsigned long long)c->written, (unsigned long long)c->margin,
		       (unsigned long long)c->record_age_ms);
		break;
	case XFRMSYNC_COMMIT_NEEDS_REKEY:
		tally->rekey++;
		printf("%s %s needs-rekey synced %llu next %llu margin %llu\n", sa, direction_name(c->direction),
		       (unsigned long long)c->synced, (unsigned long long)c->next, (unsigned long long)c->margin);
		break;
	case XFRMSYNC_COMMIT_MISMATCH:
		tally->failed++;
		printf("%s %s mismatch %s\n", sa, direction_name(c->direction), mismatch_name(c->mismatch));
		break;
	case XFRMSYNC_COMMIT_FAILED:
		tally->failed++;
		printf("%s %s failed %d %s\n", sa, direction_name(c->direction), c->error,
		       c->error_message ? c->error_message : "");
		break;
	case XFRMSYNC_COMMIT_MISSING:
		tally->missing++;
		printf("%s %s missing (no such SA in the standby namespace)\n", sa, direction_name(c->direction));
		break;
	default:
		tally->failed++;
		printf("%s outcome %u unknown to this program\n", sa, c->outcome);
	}
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

/* The active side for `seconds`: poll its fd, dispatch when readable or due. */
static int run_active(xfrmsync_active *active, struct link *link, double seconds)
{
	double end = now_ms() + seconds * 1000.0;
	int errors = 0;

	for (double left; (left = end - now_ms()) > 0;) {
		struct pollfd p = { .fd = xfrmsync_active_fd(active), .events = POLLIN };
		int due = xfrmsync_active_next_due_ms(active);
		int timeout = due >= 0 && due < left ? due : (int)left + 1;
		int rc;

		if (poll(&p, 1, timeout) < 0 && errno != EINTR) {
			perror("ha_sync: poll");
			return -1;
		}
		rc = xfrmsync_active_dispatch(active, send_record, send_gone, link);
		if (rc == -ENOBUFS)
			fprintf(stderr, "ha_sync: events lost; every SA is being sent again\n");
		else if (rc < 0) {
			fprintf(stderr, "ha_sync: dispatch: %s\n", xfrmsync_last_error());
			errors++;
		}
	}
	return errors;
}

int main(int argc, char **argv)
{
	struct link link = { 0 };
	struct tally tally = { 0 };
	xfrmsync_active *active = NULL;
	xfrmsync_handle *handle = NULL;
	uint64_t epoch = 1, new_epoch = 0;
	double seconds;
	int rc, status = 1;

	if (argc != 4 || (seconds = atof(argv[3])) <= 0) {
		fprintf(stderr, "usage: %s ACTIVE_NETNS STANDBY_NETNS SECONDS\n", argv[0]);
		return 2;
	}
	/* The cluster's epoch, which both nodes know: 1 here; a real node
	 * keeps the last one it committed or learned on disk. */
	if (xfrmsync_active_new(argv[1], epoch, 0, 0, 0, &active) < 0 ||
	    xfrmsync_standby_new(epoch, &link.standby) < 0) {
		fprintf(stderr, "ha_sync: %s\n", xfrmsync_last_error());
		goto out;
	}
	if (run_active(active, &link, seconds) < 0)
		goto out;
	printf("active %s: %lu records (%lu held, %lu older or of a lower epoch, %lu refused), %lu SAs gone; "
	       "standby holds %d SAs\n",
	       argv[1], link.records, link.held, link.ignored, link.refused, link.gone,
	       xfrmsync_standby_count(link.standby));

	struct lag lag = { .standby = link.standby };
	rc = xfrmsync_active_sample(active, 4096, compare_sample, &lag);
	if (rc < 0) {
		fprintf(stderr, "ha_sync: sampling: %s\n", xfrmsync_last_error());
		goto out;
	}
	printf("lag: %lu SAs sampled, %lu compared, greatest %llu packets behind (margin %llu), %lu over the margin\n",
	       lag.sampled, lag.compared, (unsigned long long)lag.greatest, (unsigned long long)lag.greatest_margin,
	       lag.over_margin);

	if (xfrmsync_handle_new_netns_path(argv[2], &handle) < 0) {
		fprintf(stderr, "ha_sync: %s: %s\n", argv[2], xfrmsync_last_error());
		goto out;
	}
	rc = xfrmsync_standby_commit(link.standby, handle, NULL, print_commit, &tally, &new_epoch);
	if (rc < 0) {
		fprintf(stderr, "ha_sync: commit: %s\n", xfrmsync_last_error());
		goto out;
	}
	printf("standby %s: %d SAs, %lu written, %lu need a rekey, %lu missing, %lu failed; new epoch %llu\n",
	       argv[2], rc, tally.written, tally.rekey, tally.missing, tally.failed, (unsigned long long)new_epoch);
	/* The new epoch reaches the old active node (a product sends it over
	 * its link): from now on it hands out nothing. */
	if (xfrmsync_active_learn_epoch(active, new_epoch) == 1)
		printf("active %s: replaced by epoch %llu, sends nothing more\n", argv[1],
		       (unsigned long long)new_epoch);
	status = tally.failed == 0 && link.refused == 0 && lag.failed == 0 ? 0 : 1;
out:
	xfrmsync_handle_free(handle);
	xfrmsync_standby_free(link.standby);
	xfrmsync_active_free(active);
	return status;
}

/* Watches every SA's aevents through the C API and prints each on one line.
 *
 *   watch [--json] [--netns /run/netns/NAME] [--seconds N]
 *
 * Build like any user of the library:
 *   cc watch.c $(pkg-config --cflags --libs xfrmsync) -o watch */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <xfrmsync.h>

static void print_event(void *user_data, const xfrmsync_aevent *event)
{
	const bool *json = user_data;
	char line[4096];

	xfrmsync_aevent_format(event, *json, line, sizeof(line));
	printf("%s\n", line);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	const char *netns = NULL;
	bool json = false;
	long seconds = -1;
	xfrmsync_handle *h;
	time_t end;
	int rc;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--json"))
			json = true;
		else if (!strcmp(argv[i], "--netns") && i + 1 < argc)
			netns = argv[++i];
		else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
			seconds = atol(argv[++i]);
		else {
			fprintf(stderr, "usage: %s [--json] [--netns PATH] [--seconds N]\n", argv[0]);
			return 2;
		}
	}
	rc = netns ? xfrmsync_handle_new_netns_path(netns, &h) : xfrmsync_handle_new(&h);
	if (rc < 0) {
		fprintf(stderr, "watch: %s\n", xfrmsync_last_error());
		return 1;
	}
	xfrmsync_on_event(h, print_event, &json);
	end = time(NULL) + seconds;
	while (seconds < 0 || time(NULL) < end) {
		struct pollfd p = { .fd = xfrmsync_handle_fd(h), .events = POLLIN };

		if (poll(&p, 1, 1000) <= 0)
			continue;
		rc = xfrmsync_dispatch(h);
		if (rc == -ENOBUFS)
			fprintf(stderr, "watch: events lost, resync needed\n");
		else if (rc < 0)
			fprintf(stderr, "watch: %s\n", xfrmsync_last_error());
	}
	xfrmsync_handle_free(h);
	return 0;
}

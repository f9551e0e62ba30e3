/*
 * udp-send: send UDP datagrams, optionally from another network namespace and
 * with SO_MARK. Test traffic generator for the VM rig (vmtest/).
 *
 *   udp-send [--netns /run/netns/NAME|NAME] [--mark N]
 *            DST_ADDR PORT COUNT PAYLOAD_BYTES INTERVAL_MS
 *
 * Sends COUNT datagrams of PAYLOAD_BYTES bytes each to DST_ADDR (IPv4 or IPv6)
 * port PORT, sleeping INTERVAL_MS between two datagrams (not after the last).
 * Exits 0 when every datagram was sent whole, 1 on any error (with a message
 * on stderr), 2 on bad usage. Prints one summary line on stderr.
 *
 * Build: cc -O2 -Wall -Werror -o target/vmtest/udp-send vmtest/guest/udp-send.c
 * (vmtest/smoke does it; see build_udp_send in vmtest/lib.sh).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAYLOAD 65507u /* largest IPv4 UDP payload */

static const char *prog = "udp-send";

static void usage(void)
{
	fprintf(stderr,
		"usage: %s [--netns /run/netns/NAME|NAME] [--mark N] "
		"DST_ADDR PORT COUNT PAYLOAD_BYTES INTERVAL_MS\n",
		prog);
	exit(2);
}

/* Parses a whole decimal (or 0x-prefixed hex) number in [0, max]. */
static unsigned long parse_num(const char *what, const char *s, unsigned long max)
{
	char *end;
	unsigned long v;

	if (*s == '\0' || *s == '-' || *s == '+') {
		fprintf(stderr, "%s: bad %s '%s'\n", prog, what, s);
		exit(2);
	}
	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno != 0 || *end != '\0' || v > max) {
		fprintf(stderr, "%s: bad %s '%s' (0..%lu)\n", prog, what, s, max);
		exit(2);
	}
	return v;
}

static void enter_netns(const char *arg)
{
	char path[PATH_MAX];
	int fd;

	if (strchr(arg, '/') != NULL)
		snprintf(path, sizeof(path), "%s", arg);
	else
		snprintf(path, sizeof(path), "/run/netns/%s", arg);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		fprintf(stderr, "%s: open %s: %s\n", prog, path, strerror(errno));
		exit(1);
	}
	if (setns(fd, CLONE_NEWNET) < 0) {
		fprintf(stderr, "%s: setns %s: %s\n", prog, path, strerror(errno));
		exit(1);
	}
	close(fd);
}

static void sleep_ms(unsigned long ms)
{
	struct timespec ts = { .tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

int main(int argc, char **argv)
{
	const char *netns = NULL;
	int have_mark = 0;
	unsigned long mark = 0;
	struct sockaddr_storage dst;
	socklen_t dstlen;
	unsigned long port, count, size, interval, i;
	unsigned char *payload;
	int argi = 1, fd;

	memset(&dst, 0, sizeof(dst));
	while (argi < argc && strncmp(argv[argi], "--", 2) == 0) {
		if (strcmp(argv[argi], "--") == 0) {
			argi++;
			break;
		} else if (strcmp(argv[argi], "--netns") == 0 && argi + 1 < argc) {
			netns = argv[argi + 1];
			argi += 2;
		} else if (strcmp(argv[argi], "--mark") == 0 && argi + 1 < argc) {
			mark = parse_num("mark", argv[argi + 1], 0xffffffffUL);
			have_mark = 1;
			argi += 2;
		} else {
			usage();
		}
	}
	if (argc - argi != 5)
		usage();

	port = parse_num("port", argv[argi + 1], 65535);
	count = parse_num("count", argv[argi + 2], 100000000UL);
	size = parse_num("payload size", argv[argi + 3], MAX_PAYLOAD);
	interval = parse_num("interval", argv[argi + 4], 3600000UL);
	if (port == 0) {
		fprintf(stderr, "%s: port must not be 0\n", prog);
		return 2;
	}

	{
		struct sockaddr_in *s4 = (struct sockaddr_in *)&dst;
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&dst;

		if (inet_pton(AF_INET, argv[argi], &s4->sin_addr) == 1) {
			s4->sin_family = AF_INET;
			s4->sin_port = htons((uint16_t)port);
			dstlen = sizeof(*s4);
		} else if (inet_pton(AF_INET6, argv[argi], &s6->sin6_addr) == 1) {
			s6->sin6_family = AF_INET6;
			s6->sin6_port = htons((uint16_t)port);
			dstlen = sizeof(*s6);
		} else {
			fprintf(stderr, "%s: bad address '%s' (IPv4 or IPv6 literal)\n", prog,
				argv[argi]);
			return 2;
		}
	}

	if (netns != NULL)
		enter_netns(netns);

	fd = socket(dst.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		fprintf(stderr, "%s: socket: %s\n", prog, strerror(errno));
		return 1;
	}
	if (have_mark) {
		unsigned int m = (unsigned int)mark;

		if (setsockopt(fd, SOL_SOCKET, SO_MARK, &m, sizeof(m)) < 0) {
			fprintf(stderr, "%s: setsockopt SO_MARK %u: %s\n", prog, m, strerror(errno));
			return 1;
		}
	}

	payload = malloc(size ? size : 1);
	if (payload == NULL) {
		fprintf(stderr, "%s: out of memory\n", prog);
		return 1;
	}
	for (i = 0; i < size; i++)
		payload[i] = (unsigned char)(i & 0xff);

	for (i = 0; i < count; i++) {
		ssize_t n = sendto(fd, payload, size, 0, (struct sockaddr *)&dst, dstlen);

		if (n < 0) {
			fprintf(stderr, "%s: sendto %s port %lu (datagram %lu of %lu): %s\n", prog,
				argv[argi], port, i + 1, count, strerror(errno));
			return 1;
		}
		if ((size_t)n != size) {
			fprintf(stderr, "%s: short send: %zd of %lu bytes\n", prog, n, size);
			return 1;
		}
		if (interval > 0 && i + 1 < count)
			sleep_ms(interval);
	}
	free(payload);
	close(fd);
	fprintf(stderr, "%s: sent %lu x %lu bytes to %s port %lu%s%s%s\n", prog, count, size,
		argv[argi], port, netns ? " from netns " : "", netns ? netns : "",
		have_mark ? " with SO_MARK" : "");
	return 0;
}

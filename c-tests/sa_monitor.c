/* Timestamps the XFRM notifications of the caller's network namespace:
 * SAs added, updated and deleted (XFRMNLGRP_SA) and aevents
 * (XFRMNLGRP_AEVENTS), on one socket so that their order is the kernel's.
 * One JSON object per line, "t" in seconds since the epoch (CLOCK_REALTIME,
 * taken when the datagram is read), until killed:
 *
 *   sa_monitor               (run it with `ip netns exec NS`)
 *
 * {"t":1700000000.123456789,"ev":"NEWSA","src":"10.1.0.1","dst":"10.1.0.2",
 *  "spi":"0xc1234567","reqid":11,"pid":0,"seq":0}
 * {"t":...,"ev":"AE","flags":64,"dst":"10.1.0.2","spi":"0xc1234567",
 *  "reqid":11,"pid":1234,"seq":7}
 *
 * The guest suites use it to measure how long an SA exists before its
 * thresholds are set: from its NEWSA/UPDSA to the first update aevent
 * (flags & XFRM_AE_CU) of that SA. It prints {"ev":"ready"} once
 * subscribed, and {"ev":"lost"} if the kernel dropped notifications. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netlink.h>
#include <linux/xfrm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void addr_str(int family, const xfrm_address_t *a, char *buf, size_t len)
{
	if (!inet_ntop(family, a, buf, len))
		snprintf(buf, len, "?");
}

static void stamp(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	printf("{\"t\":%lld.%09ld,", (long long)ts.tv_sec, ts.tv_nsec);
}

int main(void)
{
	struct sockaddr_nl local = { .nl_family = AF_NETLINK };
	static char buf[1 << 16];
	int groups[] = { XFRMNLGRP_SA, XFRMNLGRP_AEVENTS };
	int fd, rcvbuf = 8 << 20;
	size_t i;

	setvbuf(stdout, NULL, _IOLBF, 0);
	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_XFRM);
	if (fd < 0 || bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0) {
		perror("sa_monitor: netlink socket");
		return 1;
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf));
	for (i = 0; i < sizeof(groups) / sizeof(groups[0]); i++)
		if (setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &groups[i], sizeof(groups[i])) < 0) {
			perror("sa_monitor: NETLINK_ADD_MEMBERSHIP");
			return 1;
		}
	printf("{\"ev\":\"ready\"}\n");
	for (;;) {
		ssize_t got = recv(fd, buf, sizeof(buf), 0);
		struct nlmsghdr *h;

		if (got < 0) {
			if (errno == ENOBUFS) {
				stamp();
				printf("\"ev\":\"lost\"}\n");
				continue;
			}
			if (errno == EINTR)
				continue;
			perror("sa_monitor: recv");
			return 1;
		}
		for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)got); h = NLMSG_NEXT(h, got)) {
			char src[INET6_ADDRSTRLEN], dst[INET6_ADDRSTRLEN];

			switch (h->nlmsg_type) {
			case XFRM_MSG_NEWSA:
			case XFRM_MSG_UPDSA: {
				struct xfrm_usersa_info *p = NLMSG_DATA(h);

				if (h->nlmsg_len < NLMSG_LENGTH(sizeof(*p)))
					break;
				addr_str(p->family, &p->saddr, src, sizeof(src));
				addr_str(p->family, &p->id.daddr, dst, sizeof(dst));
				stamp();
				printf("\"ev\":\"%s\",\"src\":\"%s\",\"dst\":\"%s\",\"spi\":\"0x%08x\",\"reqid\":%u,"
				       "\"pid\":%u,\"seq\":%u}\n",
				       h->nlmsg_type == XFRM_MSG_NEWSA ? "NEWSA" : "UPDSA", src, dst,
				       ntohl(p->id.spi), p->reqid, h->nlmsg_pid, h->nlmsg_seq);
				break;
			}
			case XFRM_MSG_DELSA: {
				struct xfrm_usersa_id *p = NLMSG_DATA(h);

				if (h->nlmsg_len < NLMSG_LENGTH(sizeof(*p)))
					break;
				addr_str(p->family, &p->daddr, dst, sizeof(dst));
				stamp();
				printf("\"ev\":\"DELSA\",\"dst\":\"%s\",\"spi\":\"0x%08x\",\"pid\":%u,\"seq\":%u}\n",
				       dst, ntohl(p->spi), h->nlmsg_pid, h->nlmsg_seq);
				break;
			}
			case XFRM_MSG_NEWAE: {
				struct xfrm_aevent_id *p = NLMSG_DATA(h);

				if (h->nlmsg_len < NLMSG_LENGTH(sizeof(*p)))
					break;
				addr_str(p->sa_id.family, &p->sa_id.daddr, dst, sizeof(dst));
				stamp();
				printf("\"ev\":\"AE\",\"flags\":%u,\"dst\":\"%s\",\"spi\":\"0x%08x\",\"reqid\":%u,"
				       "\"pid\":%u,\"seq\":%u}\n",
				       p->flags, dst, ntohl(p->sa_id.spi), p->reqid, h->nlmsg_pid, h->nlmsg_seq);
				break;
			}
			default:
				break;
			}
		}
	}
}

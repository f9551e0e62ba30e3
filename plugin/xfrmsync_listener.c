/*
 * The xfrmsync plugin's listener.
 *
 * Each CHILD_SA's inbound and outbound SA is registered with one libxfrmsync
 * handle (xfrmsync_register_sa) under the thresholds its child config gets
 * from charon.plugins.xfrmsync. The library applies them at once if the SA
 * exists, and whenever the kernel announces an SA of that identity (its
 * NEWSA/UPDSA notification, read by xfrmsync_dispatch from charon's
 * watcher). So registering before the install makes the gap between an
 * SA's install and its thresholds that of the watcher's reaction. Hooks:
 *
 *  - child_state_change(CHILD_INSTALLING): raised just before a new
 *    CHILD_SA's SAs are installed (first install and rekey, IKEv1 and
 *    IKEv2). The inbound SPI is allocated; the outbound one is the peer's:
 *    in the selected proposal for the initiator, in the SA payload of the
 *    peer's request for the responder (whose selected proposal carries its
 *    own SPI by then), which the message hook keeps per IKE_SA. Both are
 *    registered ahead of the install.
 *  - child_state_change(CHILD_UPDATING): raised before a MOBIKE (or NAT)
 *    address update, with the IKE_SA's new addresses already set: SAs
 *    whose identity changes are registered under the new one ahead of
 *    kernel-netlink's update_sa, which deletes each SA and adds it again
 *    from GETSA attributes (no thresholds).
 *  - child_state_change(CHILD_INSTALLED): raised after the SAs and policies
 *    are in the kernel, and after an update. It is raised before the state
 *    is stored: a CHILD_SA still in CHILD_UPDATING comes back from an
 *    update. Registers what is not registered yet (idempotent by SA
 *    identity); after an update it also sets the thresholds of each SA
 *    directly, as a safety net for an SA re-added under its old identity.
 *  - child_updown(up) and child_rekey(old, new): the same, idempotent.
 *  - child_updown(down) and child_state_change(CHILD_DESTROYING): the
 *    registrations end, so that an SPI used again later by another
 *    CHILD_SA never inherits them.
 *
 * Threads: hooks run on charon's threads with the bus lock held; the
 * library's fd is dispatched from lib->watcher's pool threads. The handle is
 * one thread at a time, so every use of it, and of the tables below, is
 * under this->mutex. Nothing that waits for an IKE_SA (e.g. the
 * child_sa_manager) is called under that mutex: a hook holding a checked-out
 * IKE_SA waits for the mutex.
 */

#include "xfrmsync_listener.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>

#include <daemon.h>
#include <encoding/payloads/sa_payload.h>
#include <collections/hashtable.h>
#include <threading/mutex.h>
#include <processing/watcher.h>

#include <xfrmsync.h>

/** Consecutive dispatch failures after which the fd is no longer watched */
#define MAX_DISPATCH_FAILURES 64

typedef struct private_xfrmsync_listener_t private_xfrmsync_listener_t;

/**
 * Private data
 */
struct private_xfrmsync_listener_t {

	/**
	 * Public interface
	 */
	xfrmsync_listener_t public;

	/**
	 * The library handle, in charon's network namespace
	 */
	xfrmsync_handle *handle;

	/**
	 * Its event fd
	 */
	int fd;

	/**
	 * Whether the fd is in lib->watcher
	 */
	bool watching;

	/**
	 * Consecutive failed dispatch calls
	 */
	u_int failures;

	/**
	 * Serialises the handle and the tables
	 */
	mutex_t *mutex;

	/**
	 * CHILD_SA unique ID => entry_t
	 */
	hashtable_t *children;

	/**
	 * xfrmsync_sa_id* (inside an entry_t) => entry_t, to name aevents
	 */
	hashtable_t *sas;

	/**
	 * IKE_SA unique ID => the ESP/AH SPI (network order) of the SA payload
	 * in the peer's last request
	 */
	hashtable_t *peer_spis;

	/**
	 * The namespace's defaults, for a threshold that is not configured
	 */
	xfrmsync_netns_defaults defaults;
};

/** Index of the inbound and the outbound SA in entry_t */
enum {
	DIR_IN = 0,
	DIR_OUT = 1,
};

static const char *dir_names[] = { "in", "out" };

/**
 * A CHILD_SA's registered SAs
 */
typedef struct {
	/** CHILD_SA unique ID */
	uint32_t unique_id;
	/** child config name */
	char *name;
	/** SA identities, by DIR_* */
	xfrmsync_sa_id sa[2];
	/** whether sa[i] is registered (and in the sas table) */
	bool registered[2];
	/** thresholds registered */
	uint32_t replay_packets;
	uint32_t timer_ms;
	/** registered ahead of the install, not installed yet */
	bool installing;
} entry_t;

static u_int sa_hash(const void *key)
{
	const xfrmsync_sa_id *sa = key;

	return chunk_hash_inc(chunk_create((u_char*)sa->daddr,
						sa->family == AF_INET6 ? 16 : 4),
						chunk_hash(chunk_from_thing(sa->spi)));
}

/**
 * Same SA as the kernel finds it for aevents: address, SPI, protocol
 */
static bool sa_equals(const void *a_, const void *b_)
{
	const xfrmsync_sa_id *a = a_, *b = b_;

	return a->spi == b->spi && a->proto == b->proto &&
		   a->family == b->family &&
		   memeq(a->daddr, b->daddr, a->family == AF_INET6 ? 16 : 4);
}

/**
 * Same identity in every field the library keys registrations on
 */
static bool sa_identical(const xfrmsync_sa_id *a, const xfrmsync_sa_id *b)
{
	return sa_equals(a, b) && a->mark_value == b->mark_value &&
		   a->mark_mask == b->mark_mask && a->if_id == b->if_id;
}

/**
 * "ESP SPI 0xc1234567 dst 10.1.0.1" into buf
 */
static char *sa_str(const xfrmsync_sa_id *sa, char *buf, size_t len)
{
	char addr[INET6_ADDRSTRLEN] = "?";

	inet_ntop(sa->family, sa->daddr, addr, sizeof(addr));
	snprintf(buf, len, "%s SPI 0x%.8x dst %s%s",
			 sa->proto == IPPROTO_AH ? "AH" : "ESP", sa->spi, addr,
			 sa->mark_mask ? " (marked)" : "");
	return buf;
}

/**
 * The identity of one of a CHILD_SA's SAs
 */
static bool sa_id_of(private_xfrmsync_listener_t *this, ike_sa_t *ike_sa,
					 child_sa_t *child_sa, bool inbound, xfrmsync_sa_id *sa)
{
	child_cfg_t *cfg = child_sa->get_config(child_sa);
	host_t *dst;
	chunk_t addr;
	mark_t mark = {};

	memset(sa, 0, sizeof(*sa));
	switch (child_sa->get_protocol(child_sa))
	{
		case PROTO_ESP:
			sa->proto = IPPROTO_ESP;
			break;
		case PROTO_AH:
			sa->proto = IPPROTO_AH;
			break;
		default:
			return FALSE;
	}
	sa->spi = ntohl(child_sa->get_spi(child_sa, inbound));
	if (!sa->spi && !inbound)
	{	/* before the install: the peer's SPI is in the selected proposal if
		 * we initiated; as responder that carries our own SPI, and the
		 * peer's was in its request */
		proposal_t *proposal = child_sa->get_proposal(child_sa);
		uint32_t spi = proposal ? proposal->get_spi(proposal) : 0;

		if (spi && spi == child_sa->get_spi(child_sa, TRUE))
		{
			this->mutex->lock(this->mutex);
			spi = (uintptr_t)this->peer_spis->get(this->peer_spis,
						(void*)(uintptr_t)ike_sa->get_unique_id(ike_sa));
			this->mutex->unlock(this->mutex);
		}
		sa->spi = ntohl(spi);
	}
	dst = inbound ? ike_sa->get_my_host(ike_sa)
				  : ike_sa->get_other_host(ike_sa);
	if (!sa->spi || !dst)
	{
		return FALSE;
	}
	addr = dst->get_address(dst);
	if (addr.len != 4 && addr.len != 16)
	{
		return FALSE;
	}
	memcpy(sa->daddr, addr.ptr, addr.len);
	sa->family = dst->get_family(dst);
	/* kernel-netlink puts the inbound mark on the SA only with mark_in_sa */
	if (!inbound || cfg->has_option(cfg, OPT_MARK_IN_SA))
	{
		mark = child_sa->get_mark(child_sa, inbound);
	}
	sa->mark_value = mark.value;
	sa->mark_mask = mark.mask;
	sa->if_id = child_sa->get_if_id(child_sa, inbound);
	return TRUE;
}

/**
 * The thresholds of a child config, FALSE if none is configured
 */
static bool thresholds_for(private_xfrmsync_listener_t *this, char *name,
						   uint32_t *replay_packets, uint32_t *timer_ms)
{
	int replay, timer;

	replay = lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.replay_packets", -1, lib->ns);
	timer = lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.timer_ms", -1, lib->ns);
	replay = lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.children.%s.replay_packets", replay,
						lib->ns, name);
	timer = lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.children.%s.timer_ms", timer,
						lib->ns, name);
	if (replay < 0 && timer < 0)
	{
		return FALSE;
	}
	*replay_packets = replay < 0 ? this->defaults.replay_packets : replay;
	*timer_ms = timer < 0 ? this->defaults.timer_ms : timer;
	return TRUE;
}

static void entry_destroy(entry_t *entry)
{
	free(entry->name);
	free(entry);
}

/**
 * Ends the registration of one SA of an entry (mutex held)
 */
static void forget(private_xfrmsync_listener_t *this, entry_t *entry, int dir)
{
	char buf[128];
	int rc;

	if (!entry->registered[dir])
	{
		return;
	}
	if (this->sas->get(this->sas, &entry->sa[dir]) == entry)
	{
		this->sas->remove(this->sas, &entry->sa[dir]);
	}
	rc = xfrmsync_unregister_sa(this->handle, &entry->sa[dir]);
	if (rc < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: unregistering %s failed: %s",
			 sa_str(&entry->sa[dir], buf, sizeof(buf)), xfrmsync_last_error());
	}
	entry->registered[dir] = FALSE;
}

/**
 * Registers a CHILD_SA's SAs with their thresholds, or gives them the
 * thresholds again after an update (readd)
 */
static void track(private_xfrmsync_listener_t *this, ike_sa_t *ike_sa,
				  child_sa_t *child_sa, bool installing, bool readd,
				  const char *hook)
{
	xfrmsync_sa_id ids[2];
	bool have[2];
	uint32_t replay, timer, unique_id;
	entry_t *entry;
	char *name, buf[128], done[2][16] = { "-", "-" };
	int dir, rc;

	name = child_sa->get_name(child_sa);
	if (!ike_sa || !thresholds_for(this, name, &replay, &timer))
	{
		return;
	}
	have[DIR_IN] = sa_id_of(this, ike_sa, child_sa, TRUE, &ids[DIR_IN]);
	have[DIR_OUT] = sa_id_of(this, ike_sa, child_sa, FALSE, &ids[DIR_OUT]);
	if (!have[DIR_IN] && !have[DIR_OUT])
	{
		return;
	}
	unique_id = child_sa->get_unique_id(child_sa);

	this->mutex->lock(this->mutex);
	entry = this->children->get(this->children, (void*)(uintptr_t)unique_id);
	if (!entry)
	{
		INIT(entry,
			.unique_id = unique_id,
			.name = strdup(name),
		);
		this->children->put(this->children, (void*)(uintptr_t)unique_id,
							entry);
	}
	entry->installing = installing;
	for (dir = DIR_IN; dir <= DIR_OUT; dir++)
	{
		if (!have[dir])
		{
			continue;
		}
		if (entry->registered[dir] && sa_identical(&entry->sa[dir], &ids[dir])
			&& entry->replay_packets == replay && entry->timer_ms == timer)
		{
			if (readd)
			{	/* re-added under the same identity: apply now rather than
				 * when the watcher sees the kernel's NEWSA */
				rc = xfrmsync_set_thresholds(this->handle, &ids[dir],
											 replay, timer);
				if (rc < 0)
				{
					DBG1(DBG_KNL, "xfrmsync: thresholds for %s failed: %s",
						 sa_str(&ids[dir], buf, sizeof(buf)),
						 xfrmsync_last_error());
				}
				snprintf(done[dir], sizeof(done[dir]), "%.8x", ids[dir].spi);
			}
			continue;
		}
		/* a new SA, or a new identity after an update: end the old
		 * registration, then register the new identity (in the table
		 * first, so that on_applied knows the SA while registering) */
		if (entry->registered[dir] &&
			!sa_identical(&entry->sa[dir], &ids[dir]))
		{
			forget(this, entry, dir);
		}
		else if (entry->registered[dir])
		{
			this->sas->remove(this->sas, &entry->sa[dir]);
		}
		entry->sa[dir] = ids[dir];
		this->sas->put(this->sas, &entry->sa[dir], entry);
		rc = xfrmsync_register_sa(this->handle, &ids[dir], replay, timer);
		if (rc < 0)
		{
			DBG1(DBG_KNL, "xfrmsync: registering %s failed: %s",
				 sa_str(&ids[dir], buf, sizeof(buf)), xfrmsync_last_error());
			this->sas->remove(this->sas, &entry->sa[dir]);
			entry->registered[dir] = FALSE;
			continue;
		}
		entry->registered[dir] = TRUE;
		snprintf(done[dir], sizeof(done[dir]), "%.8x", ids[dir].spi);
	}
	entry->replay_packets = replay;
	entry->timer_ms = timer;
	this->mutex->unlock(this->mutex);

	if (strcmp(done[DIR_IN], "-") || strcmp(done[DIR_OUT], "-"))
	{
		DBG1(DBG_KNL, "xfrmsync: CHILD_SA %s{%u} (%s): replay threshold %u "
			 "packets, timer threshold %u ms for SPIs %s_i %s_o", name,
			 unique_id, hook, replay, timer, done[DIR_IN], done[DIR_OUT]);
	}
}

/**
 * Ends the registrations of a CHILD_SA
 */
static void untrack(private_xfrmsync_listener_t *this, child_sa_t *child_sa)
{
	uint32_t unique_id = child_sa->get_unique_id(child_sa);
	entry_t *entry;

	this->mutex->lock(this->mutex);
	entry = this->children->remove(this->children,
								   (void*)(uintptr_t)unique_id);
	if (entry)
	{
		forget(this, entry, DIR_IN);
		forget(this, entry, DIR_OUT);
		DBG2(DBG_KNL, "xfrmsync: CHILD_SA %s{%u} forgotten", entry->name,
			 entry->unique_id);
		entry_destroy(entry);
	}
	this->mutex->unlock(this->mutex);
}

METHOD(listener_t, message_hook, bool,
	private_xfrmsync_listener_t *this, ike_sa_t *ike_sa, message_t *message,
	bool incoming, bool plain)
{
	sa_payload_t *sa_payload;
	linked_list_t *proposals;
	proposal_t *proposal;
	uint32_t spi = 0;

	if (!incoming || !plain || !message->get_request(message))
	{
		return TRUE;
	}
	sa_payload = (sa_payload_t*)message->get_payload(message,
											PLV2_SECURITY_ASSOCIATION);
	if (!sa_payload)
	{
		sa_payload = (sa_payload_t*)message->get_payload(message,
											PLV1_SECURITY_ASSOCIATION);
	}
	if (!sa_payload)
	{
		return TRUE;
	}
	proposals = sa_payload->get_proposals(sa_payload);
	if (proposals->get_first(proposals, (void**)&proposal) == SUCCESS &&
		(proposal->get_protocol(proposal) == PROTO_ESP ||
		 proposal->get_protocol(proposal) == PROTO_AH))
	{
		spi = proposal->get_spi(proposal);
	}
	proposals->destroy_offset(proposals, offsetof(proposal_t, destroy));
	if (spi)
	{
		this->mutex->lock(this->mutex);
		this->peer_spis->put(this->peer_spis,
					(void*)(uintptr_t)ike_sa->get_unique_id(ike_sa),
					(void*)(uintptr_t)spi);
		this->mutex->unlock(this->mutex);
	}
	return TRUE;
}

METHOD(listener_t, ike_state_change, bool,
	private_xfrmsync_listener_t *this, ike_sa_t *ike_sa, ike_sa_state_t state)
{
	if (state == IKE_DESTROYING)
	{
		this->mutex->lock(this->mutex);
		this->peer_spis->remove(this->peer_spis,
					(void*)(uintptr_t)ike_sa->get_unique_id(ike_sa));
		this->mutex->unlock(this->mutex);
	}
	return TRUE;
}

METHOD(listener_t, child_state_change, bool,
	private_xfrmsync_listener_t *this, ike_sa_t *ike_sa, child_sa_t *child_sa,
	child_sa_state_t state)
{
	bool updated;

	switch (state)
	{
		case CHILD_INSTALLING:
			track(this, ike_sa, child_sa, TRUE, FALSE, "installing");
			break;
		case CHILD_UPDATING:
			track(this, ike_sa, child_sa, FALSE, FALSE, "updating");
			break;
		case CHILD_INSTALLED:
			/* raised before the state is stored */
			updated = child_sa->get_state(child_sa) == CHILD_UPDATING;
			track(this, ike_sa, child_sa, FALSE, updated,
				  updated ? "updated" : "installed");
			break;
		case CHILD_DESTROYING:
			untrack(this, child_sa);
			break;
		default:
			break;
	}
	return TRUE;
}

METHOD(listener_t, child_updown, bool,
	private_xfrmsync_listener_t *this, ike_sa_t *ike_sa, child_sa_t *child_sa,
	bool up)
{
	if (up)
	{
		track(this, ike_sa, child_sa, FALSE, FALSE, "up");
	}
	else
	{
		untrack(this, child_sa);
	}
	return TRUE;
}

METHOD(listener_t, child_rekey, bool,
	private_xfrmsync_listener_t *this, ike_sa_t *ike_sa, child_sa_t *old,
	child_sa_t *new)
{
	track(this, ike_sa, new, FALSE, FALSE, "rekeyed");
	return TRUE;
}

/**
 * Logs an aevent (inside xfrmsync_dispatch, mutex held)
 */
static void on_event(void *data, const xfrmsync_aevent *event)
{
	private_xfrmsync_listener_t *this = data;
	entry_t *entry;
	char text[512];
	int dir;

	xfrmsync_aevent_format(event, FALSE, text, sizeof(text));
	entry = this->sas->get(this->sas, &event->sa);
	if (!entry)
	{
		DBG2(DBG_KNL, "xfrmsync: aevent %s", text);
		return;
	}
	dir = sa_equals(&entry->sa[DIR_IN], &event->sa) ? DIR_IN : DIR_OUT;
	if (xfrmsync_caused(this->handle, event) == 1)
	{	/* the echo of our own update */
		DBG3(DBG_KNL, "xfrmsync: CHILD_SA %s{%u} %s: %s", entry->name,
			 entry->unique_id, dir_names[dir], text);
		return;
	}
	DBG2(DBG_KNL, "xfrmsync: CHILD_SA %s{%u} %s: aevent %s", entry->name,
		 entry->unique_id, dir_names[dir], text);
}

/**
 * Logs each application of thresholds (inside library calls, mutex held)
 */
static void on_applied(void *data, const xfrmsync_sa_id *sa,
					   uint32_t replay_packets, uint32_t timer_ms, int result)
{
	private_xfrmsync_listener_t *this = data;
	entry_t *entry;
	char buf[128];

	if (result < 0)
	{
		entry = this->sas->get(this->sas, sa);
		if (result == -EINVAL && entry && entry->installing)
		{	/* registered ahead of the install: the inbound SA is still the
			 * kernel's larval SA of the SPI allocation, which takes no
			 * thresholds; the library applies them when the kernel
			 * announces the installed SA */
			DBG2(DBG_KNL, "xfrmsync: %s is not installed yet",
				 sa_str(sa, buf, sizeof(buf)));
			return;
		}
		DBG1(DBG_KNL, "xfrmsync: thresholds %u packets/%u ms for %s failed: "
			 "%s", replay_packets, timer_ms, sa_str(sa, buf, sizeof(buf)),
			 strerror(-result));
		return;
	}
	DBG2(DBG_KNL, "xfrmsync: %s has thresholds %u packets/%u ms",
		 sa_str(sa, buf, sizeof(buf)), replay_packets, timer_ms);
}

CALLBACK(on_readable, bool,
	private_xfrmsync_listener_t *this, int fd, watcher_event_t event)
{
	char error[256] = "";
	int rc;

	this->mutex->lock(this->mutex);
	rc = xfrmsync_dispatch(this->handle);
	if (rc < 0)
	{
		snprintf(error, sizeof(error), "%s", xfrmsync_last_error());
	}
	this->mutex->unlock(this->mutex);

	if (rc >= 0 || rc == -ENOBUFS)
	{
		this->failures = 0;
		if (rc == -ENOBUFS)
		{
			DBG1(DBG_KNL, "xfrmsync: the kernel dropped events; every SA was "
				 "listed again and given its thresholds");
		}
		return TRUE;
	}
	DBG1(DBG_KNL, "xfrmsync: dispatching events failed: %s", error);
	if (++this->failures >= MAX_DISPATCH_FAILURES)
	{
		DBG1(DBG_KNL, "xfrmsync: %u dispatch failures in a row, no longer "
			 "watching the kernel's events", this->failures);
		this->watching = FALSE;
		return FALSE;
	}
	return TRUE;
}

METHOD(xfrmsync_listener_t, watch, void,
	private_xfrmsync_listener_t *this, bool watch)
{
	if (watch && !this->watching)
	{
		this->watching = TRUE;
		lib->watcher->add(lib->watcher, this->fd, WATCHER_READ,
						  (watcher_cb_t)on_readable, this);
	}
	else if (!watch && this->watching)
	{
		this->watching = FALSE;
		lib->watcher->remove(lib->watcher, this->fd);
	}
}

METHOD(xfrmsync_listener_t, destroy, void,
	private_xfrmsync_listener_t *this)
{
	enumerator_t *enumerator;
	entry_t *entry;

	watch(this, FALSE);
	enumerator = this->children->create_enumerator(this->children);
	while (enumerator->enumerate(enumerator, NULL, &entry))
	{
		entry_destroy(entry);
	}
	enumerator->destroy(enumerator);
	this->children->destroy(this->children);
	this->sas->destroy(this->sas);
	this->peer_spis->destroy(this->peer_spis);
	xfrmsync_handle_free(this->handle);
	this->mutex->destroy(this->mutex);
	free(this);
}

/**
 * Learns the kernel's HZ while charon still has every capability, so that no
 * CHILD_SA waits for it (or has it measured on its SA)
 */
static void learn_hz()
{
	uint32_t hz;
	int source;

	hz = lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.kernel_hz", 0, lib->ns);
	if (hz && xfrmsync_set_kernel_hz(hz) == 0)
	{
		DBG2(DBG_KNL, "xfrmsync: kernel HZ %u (configured)", hz);
		return;
	}
	source = xfrmsync_learn_kernel_hz(&hz);
	if (source < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: kernel HZ unknown (%s); it will be measured "
			 "on the first SA given a timer threshold (set "
			 "charon.plugins.xfrmsync.kernel_hz to avoid that)",
			 xfrmsync_last_error());
		return;
	}
	DBG2(DBG_KNL, "xfrmsync: kernel HZ %u (%s)", hz,
		 source == XFRMSYNC_HZ_SOURCE_KERNEL_CONFIG ? "kernel config" :
		 source == XFRMSYNC_HZ_SOURCE_PRIVATE_PROBE ? "probe" : "known");
}

/*
 * Described in header
 */
xfrmsync_listener_t *xfrmsync_listener_create()
{
	private_xfrmsync_listener_t *this;
	xfrmsync_handle *handle;
	int fd;

	/* NEWAE and the GETSA dump need it after charon drops privileges */
	if (!lib->caps->keep(lib->caps, CAP_NET_ADMIN))
	{
		DBG1(DBG_KNL, "xfrmsync: CAP_NET_ADMIN capability is required");
		return NULL;
	}
	if (xfrmsync_handle_new(&handle) < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: opening the XFRM netlink handle failed: %s",
			 xfrmsync_last_error());
		return NULL;
	}
	fd = xfrmsync_handle_fd(handle);
	if (fd < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: no event fd: %s", xfrmsync_last_error());
		xfrmsync_handle_free(handle);
		return NULL;
	}
	learn_hz();

	INIT(this,
		.public = {
			.listener = {
				.message = _message_hook,
				.ike_state_change = _ike_state_change,
				.child_state_change = _child_state_change,
				.child_updown = _child_updown,
				.child_rekey = _child_rekey,
			},
			.watch = _watch,
			.destroy = _destroy,
		},
		.handle = handle,
		.fd = fd,
		.mutex = mutex_create(MUTEX_TYPE_DEFAULT),
		.children = hashtable_create(hashtable_hash_ptr, hashtable_equals_ptr,
									 32),
		.sas = hashtable_create(sa_hash, sa_equals, 32),
		.peer_spis = hashtable_create(hashtable_hash_ptr, hashtable_equals_ptr,
									  8),
		/* the kernel's own defaults, if the sysctls cannot be read */
		.defaults = { .timer_ms = 1000, .replay_packets = 2 },
	);
	if (xfrmsync_netns_defaults_read(NULL, &this->defaults) < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: reading the namespace's threshold defaults "
			 "failed (%s), assuming %u packets/%u ms", xfrmsync_last_error(),
			 this->defaults.replay_packets, this->defaults.timer_ms);
	}
	xfrmsync_on_event(handle, on_event, this);
	xfrmsync_on_applied(handle, on_applied, this);
	DBG2(DBG_KNL, "xfrmsync: libxfrmsync %s, default thresholds %d packets/"
		 "%d ms", xfrmsync_version(),
		 lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.replay_packets", -1, lib->ns),
		 lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.timer_ms", -1, lib->ns));
	return &this->public;
}

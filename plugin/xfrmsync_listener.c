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
 * Threads: hooks run on charon's threads with the bus lock held, so no hook
 * does netlink I/O, allocates in the common case, or waits for the library:
 * a hook only notes what it saw of a CHILD_SA (its SAs' identities, its
 * config's name) into a buffer allocated at load, under hook_lock, which
 * nothing holds for longer than a copy or a buffer swap, and wakes the
 * watcher through a pipe unless the watcher is looking anyway. Everything
 * else happens on lib->watcher's pool threads: under handle_lock, which no
 * hook takes, the watcher's side turns notes into the tables below and
 * into what the library must do (register, unregister, set), reads each
 * child config's thresholds, and dispatches the registry handle (SA
 * notifications only, on a socket of its own with a large buffer); the
 * aevents handle, opened only when the log shows aevents (knl level 2), is
 * dispatched by its own watcher callback. Lock order: handle_lock, then
 * table_lock; hook_lock is taken alone. Nothing that waits for an IKE_SA
 * (e.g. the child_sa_manager) is called under any of them.
 *
 * A watched fd whose dispatch fails 64 times in a row rests, and is watched
 * again after a backoff (1 s, doubling up to 60 s), logged at level 1 each
 * time with the failures so far; a timerfd wakes the watcher for that and
 * for a listing of every SA that the library owes (xfrmsync_relist_due_ms).
 */

#include "xfrmsync_listener.h"
#include "xfrmsync_hook_times.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <daemon.h>
#include <encoding/payloads/sa_payload.h>
#include <encoding/payloads/proposal_substructure.h>
#include <collections/array.h>
#include <collections/hashtable.h>
#include <collections/linked_list.h>
#include <threading/mutex.h>
#include <processing/watcher.h>

#include <xfrmsync.h>

/** Consecutive dispatch failures after which a watched fd rests */
#define MAX_DISPATCH_FAILURES 64
/** First and longest rest of a watched fd, in ms */
#define REST_FIRST_MS 1000
#define REST_MAX_MS 60000
/** Receive buffer of the SA notification socket, unless configured */
#define DEFAULT_RECEIVE_BUFFER (8 << 20)
/** Notes of hooks one buffer holds; beyond that, the hooks of a burst the
 * watcher's side has not caught up with allocate theirs */
#define NOTE_BUFFER 1024
/** While hooks keep noting, the watcher looks at the notes this often
 * instead of being woken by each hook (a wake-up is a system call and a
 * cross-CPU wake inside the hook) */
#define POLL_MS 5
/** and stops looking after this many looks found nothing */
#define POLL_IDLE_LOOKS 20

typedef struct private_xfrmsync_listener_t private_xfrmsync_listener_t;

/**
 * What a hook asks the library for, run on the watcher's side
 */
typedef struct {
	enum { OP_REGISTER, OP_UNREGISTER, OP_SET, OP_LOG } kind;
	xfrmsync_sa_id sa;
	uint32_t replay_packets;
	uint32_t timer_ms;
	/** OP_LOG: the CHILD_SA's line, logged on the watcher's side so that no
	 * hook formats or writes it */
	char name[64];
	uint32_t unique_id;
	const char *hook;
	uint32_t spis[2];
} op_t;

/** Index of the inbound and the outbound SA */
enum {
	DIR_IN = 0,
	DIR_OUT = 1,
};

static const char *dir_names[] = { "in", "out" };

/**
 * What a hook saw of a CHILD_SA, for the watcher's side; copied, so that a
 * hook neither allocates nor touches the tables
 */
typedef struct {
	enum { NOTE_TRACK, NOTE_UNTRACK } kind;
	uint32_t unique_id;
	/** NOTE_TRACK: the SAs' identities, by DIR_*, where known */
	bool have[2];
	xfrmsync_sa_id sa[2];
	/** NOTE_TRACK: re-added under the same identity by an update */
	bool readd;
	/** the hook, for the log (a string constant) */
	const char *hook;
	/** child config name; in long_name (allocated) if it does not fit */
	char name[64];
	char *long_name;
} note_t;

/**
 * A child config's thresholds, as strongswan.conf gives them
 */
typedef struct {
	bool configured;
	uint32_t replay_packets;
	uint32_t timer_ms;
} child_thresholds_t;

/**
 * An fd in lib->watcher, and how its dispatch fares
 */
typedef struct {
	int fd;
	/** in lib->watcher */
	bool watched;
	/** taken out after MAX_DISPATCH_FAILURES, watched again at rest_until */
	bool resting;
	timeval_t rest_until;
	u_int rest_ms;
	/** failed dispatch calls: in a row, and since load */
	u_int failures;
	u_int total_failures;
	/** name for the log */
	const char *name;
} watched_t;

/**
 * Private data
 */
struct private_xfrmsync_listener_t {

	/**
	 * Public interface
	 */
	xfrmsync_listener_t public;

	/**
	 * The handle with the rules: SA notifications, NEWAE (handle_lock)
	 */
	xfrmsync_handle *registry;
	watched_t registry_fd;

	/**
	 * The port its update events carry
	 */
	int64_t registry_port;

	/**
	 * The handle joined to aevents, NULL unless the log shows them
	 */
	xfrmsync_handle *aevents;
	watched_t aevents_fd;

	/**
	 * Hooks write a byte to wake[1] when they note something while the
	 * watcher is not looking
	 */
	int wake[2];

	/**
	 * timerfd: a resting fd's backoff, an owed listing
	 */
	int timer;

	/**
	 * Whether the fds are in lib->watcher (watch())
	 */
	bool watching;

	/**
	 * Serialises the registry handle: the watcher's side only
	 */
	mutex_t *handle_lock;

	/**
	 * Serialises the tables and the thresholds cache between the watcher's
	 * side, the aevents callback and reload; no hook takes it
	 */
	mutex_t *table_lock;

	/**
	 * Serialises what hooks share: the notes being filled and peer_spis;
	 * held for a copy or a swap, never with another lock
	 */
	mutex_t *hook_lock;

	/**
	 * Two buffers of NOTE_BUFFER notes: hooks fill notes[filling] (noted
	 * so far), the watcher's side takes it and swaps (hook_lock)
	 */
	note_t *notes[2];
	u_int filling;
	u_int noted;

	/**
	 * note_t beyond a full buffer, in order (hook_lock)
	 */
	linked_list_t *overflow;

	/**
	 * op_t for the library, made from notes (the watcher's side,
	 * handle_lock)
	 */
	linked_list_t *queue;

	/**
	 * xfrmsync_sa_id of registrations the library refused: their
	 * unregistration is not passed on, so it never ends another owner's
	 */
	array_t *unmatched;

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
	 * in the peer's last request (hooks only, hook_lock)
	 */
	hashtable_t *peer_spis;

	/**
	 * The namespace's defaults, for a threshold that is not configured
	 */
	xfrmsync_netns_defaults defaults;

	/**
	 * Time spent in hooks: counts per microsecond, the longest, in ns
	 */
	xfrmsync_hook_times_t *hooks;

	/**
	 * Dispatch failures injected so far (test.fail_dispatch)
	 */
	u_int injected;

	/**
	 * The highest level the configured loggers show KNL messages at
	 */
	int log_level;

	/**
	 * A wake-up is pending: hooks skip the write (atomic)
	 */
	bool wake_pending;

	/**
	 * The watcher looks at the queue every POLL_MS: hooks skip the wake-up
	 * (atomic); the looks that found nothing in a row (handle_lock)
	 */
	bool polling;
	u_int idle_looks;

	/**
	 * Child config name => child_thresholds_t, until settings reload
	 */
	hashtable_t *thresholds;
};

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
			this->hook_lock->lock(this->hook_lock);
			spi = (uintptr_t)this->peer_spis->get(this->peer_spis,
						(void*)(uintptr_t)ike_sa->get_unique_id(ike_sa));
			this->hook_lock->unlock(this->hook_lock);
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
 * The thresholds of a child config from strongswan.conf, FALSE if none is
 * configured
 */
static bool thresholds_configured(private_xfrmsync_listener_t *this,
								  char *name, uint32_t *replay_packets,
								  uint32_t *timer_ms)
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

/**
 * The thresholds of a child config, FALSE if none is configured: from the
 * cache that a settings reload empties, so that strongswan.conf is read
 * once per child config
 */
static bool thresholds_for(private_xfrmsync_listener_t *this, char *name,
						   uint32_t *replay_packets, uint32_t *timer_ms)
{
	child_thresholds_t *known, *fresh;
	bool configured;

	this->table_lock->lock(this->table_lock);
	known = this->thresholds->get(this->thresholds, name);
	if (known)
	{
		*replay_packets = known->replay_packets;
		*timer_ms = known->timer_ms;
		this->table_lock->unlock(this->table_lock);
		return known->configured;
	}
	this->table_lock->unlock(this->table_lock);

	INIT(fresh);
	fresh->configured = thresholds_configured(this, name,
								&fresh->replay_packets, &fresh->timer_ms);
	*replay_packets = fresh->replay_packets;
	*timer_ms = fresh->timer_ms;
	configured = fresh->configured;
	this->table_lock->lock(this->table_lock);
	if (this->thresholds->get(this->thresholds, name))
	{	/* another hook was quicker */
		free(fresh);
	}
	else
	{
		this->thresholds->put(this->thresholds, strdup(name), fresh);
	}
	this->table_lock->unlock(this->table_lock);
	return configured;
}

/**
 * Empties the thresholds cache (table_lock held)
 */
static void forget_thresholds(private_xfrmsync_listener_t *this)
{
	enumerator_t *enumerator;
	char *name;
	child_thresholds_t *known;

	enumerator = this->thresholds->create_enumerator(this->thresholds);
	while (enumerator->enumerate(enumerator, &name, &known))
	{
		this->thresholds->remove_at(this->thresholds, enumerator);
		free(name);
		free(known);
	}
	enumerator->destroy(enumerator);
}

static void entry_destroy(entry_t *entry)
{
	free(entry->name);
	free(entry);
}

/**
 * Queues what the library must do for an SA (the watcher's side)
 */
static void enqueue(private_xfrmsync_listener_t *this, int kind,
					const xfrmsync_sa_id *sa, uint32_t replay_packets,
					uint32_t timer_ms)
{
	op_t *op;

	INIT(op,
		.kind = kind,
		.sa = *sa,
		.replay_packets = replay_packets,
		.timer_ms = timer_ms,
	);
	this->queue->insert_last(this->queue, op);
}

/**
 * Wakes the watcher's side to take the notes; a full pipe has a wake-up
 * pending already
 */
static void wake(private_xfrmsync_listener_t *this)
{
	if (__atomic_load_n(&this->polling, __ATOMIC_SEQ_CST))
	{	/* the watcher looks within POLL_MS */
		return;
	}
	if (!__atomic_exchange_n(&this->wake_pending, TRUE, __ATOMIC_ACQ_REL))
	{
		ignore_result(write(this->wake[1], "", 1));
	}
}

/**
 * Ends the registration of one SA of an entry (table_lock held)
 */
static void forget(private_xfrmsync_listener_t *this, entry_t *entry, int dir)
{
	if (!entry->registered[dir])
	{
		return;
	}
	if (this->sas->get(this->sas, &entry->sa[dir]) == entry)
	{
		this->sas->remove(this->sas, &entry->sa[dir]);
	}
	enqueue(this, OP_UNREGISTER, &entry->sa[dir], 0, 0);
	entry->registered[dir] = FALSE;
}

/**
 * Registers a CHILD_SA's SAs with their thresholds, or gives them the
 * thresholds again after an update (readd): the watcher's side of a hook's
 * note, which queues the library's work
 */
static void apply_track(private_xfrmsync_listener_t *this, note_t *note)
{
	uint32_t replay, timer;
	entry_t *entry;
	uint32_t done[2] = { 0, 0 };
	char *name = note->long_name ?: note->name;
	int dir;

	if (!thresholds_for(this, name, &replay, &timer))
	{
		return;
	}
	this->table_lock->lock(this->table_lock);
	entry = this->children->get(this->children,
								(void*)(uintptr_t)note->unique_id);
	if (!entry)
	{
		INIT(entry,
			.unique_id = note->unique_id,
			.name = strdup(name),
		);
		this->children->put(this->children,
							(void*)(uintptr_t)note->unique_id, entry);
	}
	for (dir = DIR_IN; dir <= DIR_OUT; dir++)
	{
		if (!note->have[dir])
		{
			continue;
		}
		if (entry->registered[dir] &&
			sa_identical(&entry->sa[dir], &note->sa[dir]) &&
			entry->replay_packets == replay && entry->timer_ms == timer)
		{
			if (note->readd)
			{	/* re-added under the same identity: apply now rather than
				 * when the watcher sees the kernel's NEWSA */
				enqueue(this, OP_SET, &note->sa[dir], replay, timer);
				done[dir] = note->sa[dir].spi;
			}
			continue;
		}
		/* a new SA, or a new identity after an update: end the old
		 * registration, then register the new identity (in the table
		 * first, so that on_applied knows the SA) */
		if (entry->registered[dir] &&
			!sa_identical(&entry->sa[dir], &note->sa[dir]))
		{
			forget(this, entry, dir);
		}
		else if (entry->registered[dir])
		{	/* new thresholds for the same identity: one registration
			 * replaces the other */
			enqueue(this, OP_UNREGISTER, &entry->sa[dir], 0, 0);
			this->sas->remove(this->sas, &entry->sa[dir]);
		}
		entry->sa[dir] = note->sa[dir];
		this->sas->put(this->sas, &entry->sa[dir], entry);
		enqueue(this, OP_REGISTER, &note->sa[dir], replay, timer);
		entry->registered[dir] = TRUE;
		done[dir] = note->sa[dir].spi;
	}
	entry->replay_packets = replay;
	entry->timer_ms = timer;
	if (done[DIR_IN] || done[DIR_OUT])
	{
		op_t *line;

		INIT(line,
			.kind = OP_LOG,
			.unique_id = note->unique_id,
			.hook = note->hook,
			.replay_packets = replay,
			.timer_ms = timer,
			.spis = { done[DIR_IN], done[DIR_OUT] },
		);
		snprintf(line->name, sizeof(line->name), "%s", name);
		this->queue->insert_last(this->queue, line);
	}
	this->table_lock->unlock(this->table_lock);
}

/**
 * Ends the registrations of a CHILD_SA (the watcher's side of a hook's
 * note)
 */
static void apply_untrack(private_xfrmsync_listener_t *this, note_t *note)
{
	entry_t *entry;

	this->table_lock->lock(this->table_lock);
	entry = this->children->remove(this->children,
								   (void*)(uintptr_t)note->unique_id);
	if (entry)
	{
		forget(this, entry, DIR_IN);
		forget(this, entry, DIR_OUT);
	}
	this->table_lock->unlock(this->table_lock);
	if (entry)
	{
		DBG2(DBG_KNL, "xfrmsync: CHILD_SA %s{%u} forgotten", entry->name,
			 entry->unique_id);
		entry_destroy(entry);
	}
}

/**
 * Hands a note to the watcher's side: a copy into the buffer, a wake-up
 * unless the watcher looks anyway
 */
static void post(private_xfrmsync_listener_t *this, note_t *note)
{
	note_t *late;

	this->hook_lock->lock(this->hook_lock);
	if (this->noted < NOTE_BUFFER)
	{
		this->notes[this->filling][this->noted++] = *note;
	}
	else
	{	/* a burst the watcher's side has not caught up with */
		late = malloc(sizeof(*late));
		*late = *note;
		this->overflow->insert_last(this->overflow, late);
	}
	this->hook_lock->unlock(this->hook_lock);
	wake(this);
}

/**
 * A hook's note of a CHILD_SA whose SAs get (or get again) thresholds
 */
static void note_track(private_xfrmsync_listener_t *this, ike_sa_t *ike_sa,
					   child_sa_t *child_sa, bool readd, const char *hook)
{
	note_t note = {
		.kind = NOTE_TRACK,
		.readd = readd,
		.hook = hook,
	};
	char *name;
	size_t len;

	if (!ike_sa)
	{
		return;
	}
	note.have[DIR_IN] = sa_id_of(this, ike_sa, child_sa, TRUE,
								 &note.sa[DIR_IN]);
	note.have[DIR_OUT] = sa_id_of(this, ike_sa, child_sa, FALSE,
								  &note.sa[DIR_OUT]);
	if (!note.have[DIR_IN] && !note.have[DIR_OUT])
	{
		return;
	}
	note.unique_id = child_sa->get_unique_id(child_sa);
	name = child_sa->get_name(child_sa);
	len = strlen(name);
	if (len < sizeof(note.name))
	{
		memcpy(note.name, name, len + 1);
	}
	else
	{
		note.long_name = strdup(name);
	}
	post(this, &note);
}

/**
 * A hook's note of a CHILD_SA going away
 */
static void note_untrack(private_xfrmsync_listener_t *this,
						 child_sa_t *child_sa)
{
	note_t note = {
		.kind = NOTE_UNTRACK,
		.unique_id = child_sa->get_unique_id(child_sa),
	};

	post(this, &note);
}

METHOD(listener_t, message_hook, bool,
	private_xfrmsync_listener_t *this, ike_sa_t *ike_sa, message_t *message,
	bool incoming, bool plain)
{
	sa_payload_t *sa_payload;
	proposal_substructure_t *substructure;
	enumerator_t *enumerator;
	uint8_t protocol;
	uint32_t spi = 0;
	chunk_t raw;
	hook_clock_t start;

	if (!incoming || !plain || !message->get_request(message))
	{
		return TRUE;
	}
	hook_start(this->hooks, &start);
	sa_payload = (sa_payload_t*)message->get_payload(message,
											PLV2_SECURITY_ASSOCIATION);
	if (!sa_payload)
	{
		sa_payload = (sa_payload_t*)message->get_payload(message,
											PLV1_SECURITY_ASSOCIATION);
	}
	if (!sa_payload)
	{
		hook_times_done(this->hooks, HOOK_MESSAGE, &start);
		return TRUE;
	}
	/* the first proposal's SPI, read in place: building proposal_t objects
	 * for every request would cost the hook far more */
	enumerator = sa_payload->create_substructure_enumerator(sa_payload);
	if (enumerator->enumerate(enumerator, &substructure))
	{
		protocol = substructure->get_protocol_id(substructure);
		raw = substructure->get_spi(substructure);
		if ((protocol == PROTO_ESP || protocol == PROTO_AH) &&
			raw.len == sizeof(spi))
		{
			memcpy(&spi, raw.ptr, sizeof(spi));
		}
	}
	enumerator->destroy(enumerator);
	if (spi)
	{
		this->hook_lock->lock(this->hook_lock);
		this->peer_spis->put(this->peer_spis,
					(void*)(uintptr_t)ike_sa->get_unique_id(ike_sa),
					(void*)(uintptr_t)spi);
		this->hook_lock->unlock(this->hook_lock);
	}
	hook_times_done(this->hooks, HOOK_MESSAGE, &start);
	return TRUE;
}

METHOD(listener_t, ike_state_change, bool,
	private_xfrmsync_listener_t *this, ike_sa_t *ike_sa, ike_sa_state_t state)
{
	hook_clock_t start;

	if (state == IKE_DESTROYING)
	{
		hook_start(this->hooks, &start);
		this->hook_lock->lock(this->hook_lock);
		this->peer_spis->remove(this->peer_spis,
					(void*)(uintptr_t)ike_sa->get_unique_id(ike_sa));
		this->hook_lock->unlock(this->hook_lock);
		hook_times_done(this->hooks, HOOK_IKE_STATE, &start);
	}
	return TRUE;
}

METHOD(listener_t, child_state_change, bool,
	private_xfrmsync_listener_t *this, ike_sa_t *ike_sa, child_sa_t *child_sa,
	child_sa_state_t state)
{
	hook_clock_t start;
	bool updated;
	int kind;

	hook_start(this->hooks, &start);
	switch (state)
	{
		case CHILD_INSTALLING:
			note_track(this, ike_sa, child_sa, FALSE, "installing");
			kind = HOOK_CHILD_INSTALLING;
			break;
		case CHILD_UPDATING:
			note_track(this, ike_sa, child_sa, FALSE, "updating");
			kind = HOOK_CHILD_UPDATING;
			break;
		case CHILD_INSTALLED:
			/* raised before the state is stored */
			updated = child_sa->get_state(child_sa) == CHILD_UPDATING;
			note_track(this, ike_sa, child_sa, updated,
					   updated ? "updated" : "installed");
			kind = HOOK_CHILD_INSTALLED;
			break;
		case CHILD_DESTROYING:
			note_untrack(this, child_sa);
			kind = HOOK_CHILD_DESTROYING;
			break;
		default:
			return TRUE;
	}
	hook_times_done(this->hooks, kind, &start);
	return TRUE;
}

METHOD(listener_t, child_updown, bool,
	private_xfrmsync_listener_t *this, ike_sa_t *ike_sa, child_sa_t *child_sa,
	bool up)
{
	hook_clock_t start;

	hook_start(this->hooks, &start);
	if (up)
	{
		note_track(this, ike_sa, child_sa, FALSE, "up");
	}
	else
	{
		note_untrack(this, child_sa);
	}
	hook_times_done(this->hooks, HOOK_CHILD_UPDOWN, &start);
	return TRUE;
}

METHOD(listener_t, child_rekey, bool,
	private_xfrmsync_listener_t *this, ike_sa_t *ike_sa, child_sa_t *old,
	child_sa_t *new)
{
	hook_clock_t start;

	hook_start(this->hooks, &start);
	note_track(this, ike_sa, new, FALSE, "rekeyed");
	hook_times_done(this->hooks, HOOK_CHILD_REKEY, &start);
	return TRUE;
}

/**
 * Logs an aevent (inside the aevents handle's dispatch); there is no such
 * handle unless the log shows level 2
 */
static void on_event(void *data, const xfrmsync_aevent *event)
{
	private_xfrmsync_listener_t *this = data;
	entry_t *entry;
	char text[512], name[64] = "";
	uint32_t unique_id = 0;
	int dir = DIR_IN;
	bool echo;

	this->table_lock->lock(this->table_lock);
	entry = this->sas->get(this->sas, &event->sa);
	if (entry)
	{
		snprintf(name, sizeof(name), "%s", entry->name);
		unique_id = entry->unique_id;
		dir = sa_equals(&entry->sa[DIR_IN], &event->sa) ? DIR_IN : DIR_OUT;
	}
	this->table_lock->unlock(this->table_lock);

	xfrmsync_aevent_format(event, FALSE, text, sizeof(text));
	if (!entry)
	{
		DBG2(DBG_KNL, "xfrmsync: aevent %s", text);
		return;
	}
	/* the echo of the registry handle's own update: its NEWAE carried the
	 * registry handle's port id */
	echo = (event->cause & XFRMSYNC_CAUSE_UPDATE) &&
		   (int64_t)event->nlmsg_pid == this->registry_port;
	if (echo)
	{
		DBG3(DBG_KNL, "xfrmsync: CHILD_SA %s{%u} %s: %s", name, unique_id,
			 dir_names[dir], text);
		return;
	}
	DBG2(DBG_KNL, "xfrmsync: CHILD_SA %s{%u} %s: aevent %s", name, unique_id,
		 dir_names[dir], text);
}

/**
 * Logs each application of thresholds (inside the registry handle's calls,
 * handle_lock held)
 */
static void on_applied(void *data, const xfrmsync_sa_id *sa,
					   uint32_t replay_packets, uint32_t timer_ms, int result,
					   const char *rule)
{
	private_xfrmsync_listener_t *this = data;
	char buf[128];

	if (result < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: thresholds %u packets/%u ms for %s failed: "
			 "%s", replay_packets, timer_ms, sa_str(sa, buf, sizeof(buf)),
			 strerror(-result));
		return;
	}
	if (this->log_level >= 2)
	{	/* per SA: not formatted for a log that does not show it */
		DBG2(DBG_KNL, "xfrmsync: %s has thresholds %u packets/%u ms%s%s",
			 sa_str(sa, buf, sizeof(buf)), replay_packets, timer_ms,
			 rule ? " of rule " : "", rule ? rule : "");
	}
}

/**
 * Runs one queued operation (handle_lock held)
 */
static void run_op(private_xfrmsync_listener_t *this, op_t *op)
{
	xfrmsync_sa_id refused;
	char buf[128];
	int i, rc;

	switch (op->kind)
	{
		case OP_REGISTER:
			rc = xfrmsync_register_sa(this->registry, &op->sa,
									  op->replay_packets, op->timer_ms);
			if (rc < 0)
			{
				DBG1(DBG_KNL, "xfrmsync: registering %s failed: %s",
					 sa_str(&op->sa, buf, sizeof(buf)), xfrmsync_last_error());
				array_insert(this->unmatched, ARRAY_TAIL, &op->sa);
			}
			return;
		case OP_UNREGISTER:
			for (i = 0; i < array_count(this->unmatched); i++)
			{
				array_get(this->unmatched, i, &refused);
				if (sa_identical(&refused, &op->sa))
				{	/* the library never counted it */
					array_remove(this->unmatched, i, NULL);
					return;
				}
			}
			rc = xfrmsync_unregister_sa(this->registry, &op->sa);
			if (rc < 0)
			{
				DBG1(DBG_KNL, "xfrmsync: unregistering %s failed: %s",
					 sa_str(&op->sa, buf, sizeof(buf)), xfrmsync_last_error());
			}
			return;
		case OP_LOG:
		{
			char in[16] = "-", out[16] = "-";

			if (op->spis[DIR_IN])
			{
				snprintf(in, sizeof(in), "%.8x", op->spis[DIR_IN]);
			}
			if (op->spis[DIR_OUT])
			{
				snprintf(out, sizeof(out), "%.8x", op->spis[DIR_OUT]);
			}
			DBG1(DBG_KNL, "xfrmsync: CHILD_SA %s{%u} (%s): replay threshold %u "
				 "packets, timer threshold %u ms for SPIs %s_i %s_o", op->name,
				 op->unique_id, op->hook, op->replay_packets, op->timer_ms, in,
				 out);
			return;
		}
		case OP_SET:
			rc = xfrmsync_set_thresholds(this->registry, &op->sa,
										 op->replay_packets, op->timer_ms);
			if (rc < 0)
			{
				DBG1(DBG_KNL, "xfrmsync: thresholds for %s failed: %s",
					 sa_str(&op->sa, buf, sizeof(buf)), xfrmsync_last_error());
			}
			return;
	}
}

/**
 * Milliseconds from now until tv, 0 if it has passed
 */
static u_int ms_until(timeval_t *tv)
{
	timeval_t now;

	time_monotonic(&now);
	if (!timercmp(&now, tv, <))
	{
		return 0;
	}
	return (tv->tv_sec - now.tv_sec) * 1000 +
		   (tv->tv_usec - now.tv_usec) / 1000 + 1;
}

/**
 * Arms the timerfd for the earliest of an owed listing and a resting fd's
 * return (handle_lock held); disarms it when there is neither
 */
static void arm_timer(private_xfrmsync_listener_t *this)
{
	struct itimerspec when = {};
	int due = xfrmsync_relist_due_ms(this->registry);
	watched_t *all[] = { &this->registry_fd, &this->aevents_fd };
	u_int i, ms;

	for (i = 0; i < countof(all); i++)
	{
		if (all[i]->resting)
		{
			ms = ms_until(&all[i]->rest_until);
			due = due < 0 ? (int)ms : min(due, (int)ms);
		}
	}
	if (__atomic_load_n(&this->polling, __ATOMIC_SEQ_CST))
	{
		due = due < 0 ? POLL_MS : min(due, POLL_MS);
	}
	if (due >= 0)
	{	/* 0 would disarm it */
		due = max(due, 1);
		when.it_value.tv_sec = due / 1000;
		when.it_value.tv_nsec = (due % 1000) * 1000000L;
	}
	timerfd_settime(this->timer, 0, &when, NULL);
}

/**
 * Counts a dispatch's outcome for a watched fd; FALSE when the fd must
 * rest (taken out of the watcher, back after a backoff)
 */
static bool dispatch_fared(private_xfrmsync_listener_t *this, watched_t *w,
						   int rc, const char *error)
{
	if (rc >= 0 || rc == -ENOBUFS)
	{
		w->failures = 0;
		w->rest_ms = 0;
		if (rc == -ENOBUFS && w == &this->registry_fd)
		{	/* the library lists every SA again, a step per dispatch */
			DBG1(DBG_KNL, "xfrmsync: the kernel dropped SA notifications; "
				 "every SA is being listed again");
		}
		else if (rc == -ENOBUFS)
		{
			DBG1(DBG_KNL, "xfrmsync: the kernel dropped aevents");
		}
		return TRUE;
	}
	w->total_failures++;
	DBG1(DBG_KNL, "xfrmsync: dispatching %s failed: %s (%u in a row, %u since"
		 " load)", w->name, error, w->failures + 1, w->total_failures);
	if (++w->failures < MAX_DISPATCH_FAILURES)
	{
		return TRUE;
	}
	w->rest_ms = w->rest_ms ? min(w->rest_ms * 2, REST_MAX_MS) : REST_FIRST_MS;
	time_monotonic(&w->rest_until);
	timeval_add_ms(&w->rest_until, w->rest_ms);
	w->resting = TRUE;
	w->watched = FALSE;
	w->failures = 0;
	DBG1(DBG_KNL, "xfrmsync: %s: %u dispatch failures in a row; watched again"
		 " in %u ms (%u failures since load)", w->name, MAX_DISPATCH_FAILURES,
		 w->rest_ms, w->total_failures);
	return FALSE;
}

static void apply_note(private_xfrmsync_listener_t *this, note_t *note)
{
	if (note->kind == NOTE_TRACK)
	{
		apply_track(this, note);
	}
	else
	{
		apply_untrack(this, note);
	}
	free(note->long_name);
}

/**
 * Takes the hooks' notes and turns them into tables and queued work, in
 * the order the hooks wrote them (handle_lock held); returns how many
 */
static u_int apply_notes(private_xfrmsync_listener_t *this)
{
	linked_list_t *overflow = NULL;
	note_t *notes, *late;
	u_int count, i;

	this->hook_lock->lock(this->hook_lock);
	notes = this->notes[this->filling];
	count = this->noted;
	/* the other buffer was emptied by the last call: hooks fill it now */
	this->filling ^= 1;
	this->noted = 0;
	if (this->overflow->get_count(this->overflow))
	{
		overflow = this->overflow;
		this->overflow = linked_list_create();
	}
	this->hook_lock->unlock(this->hook_lock);

	for (i = 0; i < count; i++)
	{
		apply_note(this, &notes[i]);
	}
	if (overflow)
	{
		count += overflow->get_count(overflow);
		while (overflow->remove_first(overflow, (void**)&late) == SUCCESS)
		{
			apply_note(this, late);
			free(late);
		}
		overflow->destroy(overflow);
	}
	return count;
}

/**
 * Whether hooks wrote notes not taken yet
 */
static bool notes_pending(private_xfrmsync_listener_t *this)
{
	bool pending;

	this->hook_lock->lock(this->hook_lock);
	pending = this->noted || this->overflow->get_count(this->overflow);
	this->hook_lock->unlock(this->hook_lock);
	return pending;
}

/**
 * The registry's side of the work: the hooks' notes, the library's work
 * they make, then dispatch. Returns FALSE when the registry fd must rest.
 */
static bool run_registry(private_xfrmsync_listener_t *this)
{
	op_t *op;
	char error[256] = "";
	bool keep;
	int rc;
	u_int noted;

	this->handle_lock->lock(this->handle_lock);
	while (TRUE)
	{
		noted = apply_notes(this);
		while (this->queue->remove_first(this->queue, (void**)&op) == SUCCESS)
		{
			run_op(this, op);
			free(op);
		}
		/* a burst of CHILD_SAs: look every POLL_MS while it lasts, so that
		 * its hooks need not wake the watcher each */
		if (noted)
		{
			this->idle_looks = 0;
			__atomic_store_n(&this->polling, TRUE, __ATOMIC_SEQ_CST);
			break;
		}
		if (!__atomic_load_n(&this->polling, __ATOMIC_SEQ_CST) ||
			++this->idle_looks < POLL_IDLE_LOOKS)
		{
			break;
		}
		/* done looking; a hook that noted before this saw polling and
		 * did not wake us: look once more */
		__atomic_store_n(&this->polling, FALSE, __ATOMIC_SEQ_CST);
		if (!notes_pending(this))
		{
			break;
		}
	}
	if (this->injected < (u_int)lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.test.fail_dispatch", 0, lib->ns))
	{	/* a test's way to a failing dispatch: the fd stays readable */
		if (!this->injected++)
		{
			DBG1(DBG_KNL, "xfrmsync: injecting dispatch failures "
				 "(charon.plugins.xfrmsync.test.fail_dispatch)");
		}
		rc = -EIO;
		snprintf(error, sizeof(error), "injected failure %u "
				 "(charon.plugins.xfrmsync.test.fail_dispatch)", this->injected);
	}
	else
	{
		rc = xfrmsync_dispatch(this->registry);
		if (rc < 0)
		{
			snprintf(error, sizeof(error), "%s", xfrmsync_last_error());
		}
	}
	keep = dispatch_fared(this, &this->registry_fd, rc, error);
	arm_timer(this);
	this->handle_lock->unlock(this->handle_lock);
	return keep;
}

CALLBACK(on_registry_readable, bool,
	private_xfrmsync_listener_t *this, int fd, watcher_event_t event)
{
	return run_registry(this);
}

CALLBACK(on_aevents_readable, bool,
	private_xfrmsync_listener_t *this, int fd, watcher_event_t event)
{
	char error[256] = "";
	bool keep;
	int rc;

	/* only this callback uses the aevents handle; the watcher runs it on
	 * one thread at a time */
	rc = xfrmsync_dispatch(this->aevents);
	if (rc < 0)
	{
		snprintf(error, sizeof(error), "%s", xfrmsync_last_error());
	}
	/* its watched_t is this callback's until it rests: on_timer touches it
	 * only while the fd is out of the watcher */
	keep = dispatch_fared(this, &this->aevents_fd, rc, error);
	if (!keep)
	{
		this->handle_lock->lock(this->handle_lock);
		arm_timer(this);
		this->handle_lock->unlock(this->handle_lock);
	}
	return keep;
}

CALLBACK(on_wake, bool,
	private_xfrmsync_listener_t *this, int fd, watcher_event_t event)
{
	char drain[64];

	/* cleared first: a hook noting from now on writes again */
	__atomic_store_n(&this->wake_pending, FALSE, __ATOMIC_RELEASE);
	while (read(fd, drain, sizeof(drain)) > 0)
	{
	}
	if (!run_registry(this))
	{	/* the registry fd rests; taking it out here, not from its own
		 * callback, is what the watcher allows */
		lib->watcher->remove(lib->watcher, this->registry_fd.fd);
	}
	return TRUE;
}

/**
 * Puts a rested fd back into the watcher once its time has come (handle_lock
 * held)
 */
static void rearm(private_xfrmsync_listener_t *this, watched_t *w,
				  watcher_cb_t cb)
{
	if (!w->resting || !this->watching || ms_until(&w->rest_until))
	{
		return;
	}
	w->resting = FALSE;
	w->watched = TRUE;
	lib->watcher->add(lib->watcher, w->fd, WATCHER_READ, cb, this);
	DBG1(DBG_KNL, "xfrmsync: %s watched again (%u failures since load)",
		 w->name, w->total_failures);
}

CALLBACK(on_timer, bool,
	private_xfrmsync_listener_t *this, int fd, watcher_event_t event)
{
	uint64_t expirations;

	ignore_result(read(fd, &expirations, sizeof(expirations)));
	this->handle_lock->lock(this->handle_lock);
	rearm(this, &this->registry_fd, (watcher_cb_t)on_registry_readable);
	if (this->aevents)
	{
		rearm(this, &this->aevents_fd, (watcher_cb_t)on_aevents_readable);
	}
	this->handle_lock->unlock(this->handle_lock);
	/* an owed listing, or what the registry fd missed while it rested */
	if (!run_registry(this))
	{
		lib->watcher->remove(lib->watcher, this->registry_fd.fd);
	}
	return TRUE;
}

METHOD(xfrmsync_listener_t, watch, void,
	private_xfrmsync_listener_t *this, bool watch)
{
	if (watch && !this->watching)
	{
		this->watching = TRUE;
		this->registry_fd.watched = TRUE;
		lib->watcher->add(lib->watcher, this->registry_fd.fd, WATCHER_READ,
						  (watcher_cb_t)on_registry_readable, this);
		if (this->aevents)
		{
			this->aevents_fd.watched = TRUE;
			lib->watcher->add(lib->watcher, this->aevents_fd.fd, WATCHER_READ,
							  (watcher_cb_t)on_aevents_readable, this);
		}
		lib->watcher->add(lib->watcher, this->wake[0], WATCHER_READ,
						  (watcher_cb_t)on_wake, this);
		lib->watcher->add(lib->watcher, this->timer, WATCHER_READ,
						  (watcher_cb_t)on_timer, this);
	}
	else if (!watch && this->watching)
	{
		this->watching = FALSE;
		/* each waits for its callback to return; a resting fd is not in
		 * the watcher, and removing it is harmless */
		lib->watcher->remove(lib->watcher, this->timer);
		lib->watcher->remove(lib->watcher, this->wake[0]);
		lib->watcher->remove(lib->watcher, this->registry_fd.fd);
		if (this->aevents)
		{
			lib->watcher->remove(lib->watcher, this->aevents_fd.fd);
		}
		hook_times_log(this->hooks, "unloading");
		DBG1(DBG_KNL, "xfrmsync: dispatch failures since load: %u (SA "
			 "notifications), %u (aevents)", this->registry_fd.total_failures,
			 this->aevents_fd.total_failures);
	}
}

METHOD(xfrmsync_listener_t, reload, void,
	private_xfrmsync_listener_t *this)
{
	this->table_lock->lock(this->table_lock);
	forget_thresholds(this);
	this->table_lock->unlock(this->table_lock);
}

METHOD(xfrmsync_listener_t, destroy, void,
	private_xfrmsync_listener_t *this)
{
	enumerator_t *enumerator;
	entry_t *entry;
	note_t *note;

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
	while (this->noted)
	{
		free(this->notes[this->filling][--this->noted].long_name);
	}
	free(this->notes[0]);
	free(this->notes[1]);
	while (this->overflow->remove_first(this->overflow,
										(void**)&note) == SUCCESS)
	{
		free(note->long_name);
		free(note);
	}
	this->overflow->destroy(this->overflow);
	this->queue->destroy_function(this->queue, free);
	array_destroy(this->unmatched);
	forget_thresholds(this);
	this->thresholds->destroy(this->thresholds);
	xfrmsync_handle_free(this->registry);
	if (this->aevents)
	{
		xfrmsync_handle_free(this->aevents);
	}
	close(this->wake[0]);
	close(this->wake[1]);
	close(this->timer);
	hook_times_destroy(this->hooks);
	this->handle_lock->destroy(this->handle_lock);
	this->table_lock->destroy(this->table_lock);
	this->hook_lock->destroy(this->hook_lock);
	free(this);
}

/**
 * The highest level at which charon's file and syslog loggers show KNL
 * messages, as configured
 */
static int knl_log_level()
{
	const char *kinds[] = { "filelog", "syslog" };
	enumerator_t *enumerator;
	char *name;
	int level = 1, here;
	u_int i;

	for (i = 0; i < countof(kinds); i++)
	{
		enumerator = lib->settings->create_section_enumerator(lib->settings,
												"%s.%s", lib->ns, kinds[i]);
		while (enumerator->enumerate(enumerator, &name))
		{
			here = lib->settings->get_int(lib->settings, "%s.%s.%s.default",
										  1, lib->ns, kinds[i], name);
			here = lib->settings->get_int(lib->settings, "%s.%s.%s.knl", here,
										  lib->ns, kinds[i], name);
			level = max(level, here);
		}
		enumerator->destroy(enumerator);
	}
	return level;
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

/**
 * A buffer for hooks' notes, written through now: calloc would leave fresh
 * pages untouched, and a hook would take their page faults
 */
static note_t *notes_buffer()
{
	note_t *notes = malloc(NOTE_BUFFER * sizeof(note_t));

	memset(notes, 0, NOTE_BUFFER * sizeof(note_t));
	return notes;
}

/**
 * Opens a handle in charon's namespace, joined to aevents or not
 */
static xfrmsync_handle *open_handle(bool aevents, int *fd)
{
	xfrmsync_handle *handle;

	if (xfrmsync_handle_new(&handle) < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: opening an XFRM netlink handle failed: %s",
			 xfrmsync_last_error());
		return NULL;
	}
	*fd = xfrmsync_handle_fd(handle);
	if (*fd < 0 || (!aevents && xfrmsync_handle_subscribe(handle, FALSE) < 0))
	{
		DBG1(DBG_KNL, "xfrmsync: setting up a handle failed: %s",
			 xfrmsync_last_error());
		xfrmsync_handle_free(handle);
		return NULL;
	}
	return handle;
}

/*
 * Described in header
 */
xfrmsync_listener_t *xfrmsync_listener_create()
{
	private_xfrmsync_listener_t *this;
	xfrmsync_handle *registry, *aevents = NULL;
	int registry_fd, aevents_fd = -1, wake[2], timer, log_level;
	size_t buffer;

	/* NEWAE and the GETSA dump need it after charon drops privileges */
	if (!lib->caps->keep(lib->caps, CAP_NET_ADMIN))
	{
		DBG1(DBG_KNL, "xfrmsync: CAP_NET_ADMIN capability is required");
		return NULL;
	}
	/* SA notifications alone, on a socket of their own: a lost one costs
	 * a listing of every SA, so they get a large buffer (SO_RCVBUFFORCE,
	 * which CAP_NET_ADMIN permits beyond net.core.rmem_max) */
	registry = open_handle(FALSE, &registry_fd);
	if (!registry)
	{
		return NULL;
	}
	buffer = lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.receive_buffer",
						DEFAULT_RECEIVE_BUFFER, lib->ns);
	if (buffer && xfrmsync_handle_set_rcvbuf(registry, buffer) < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: a receive buffer of %zu bytes for SA "
			 "notifications failed: %s", buffer, xfrmsync_last_error());
	}
	/* aevents only where they are used: the kernel generates them only
	 * while someone listens, and the log shows them at level 2 */
	log_level = knl_log_level();
	if (lib->settings->get_bool(lib->settings,
						"%s.plugins.xfrmsync.log_aevents", log_level >= 2,
						lib->ns))
	{
		aevents = open_handle(TRUE, &aevents_fd);
	}
	if (pipe2(wake, O_NONBLOCK | O_CLOEXEC) < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: pipe: %s", strerror(errno));
		xfrmsync_handle_free(registry);
		if (aevents)
		{
			xfrmsync_handle_free(aevents);
		}
		return NULL;
	}
	timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (timer < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: timerfd: %s", strerror(errno));
		close(wake[0]);
		close(wake[1]);
		xfrmsync_handle_free(registry);
		if (aevents)
		{
			xfrmsync_handle_free(aevents);
		}
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
			.reload = _reload,
			.destroy = _destroy,
		},
		.registry = registry,
		.registry_fd = { .fd = registry_fd, .name = "SA notifications" },
		.registry_port = xfrmsync_handle_port_id(registry),
		.log_level = log_level,
		.aevents = aevents,
		.aevents_fd = { .fd = aevents_fd, .name = "aevents" },
		.wake = { wake[0], wake[1] },
		.timer = timer,
		.hooks = hook_times_create(lib->settings->get_bool(lib->settings,
						"%s.plugins.xfrmsync.hook_switches", FALSE, lib->ns)),
		.handle_lock = mutex_create(MUTEX_TYPE_DEFAULT),
		.table_lock = mutex_create(MUTEX_TYPE_DEFAULT),
		.hook_lock = mutex_create(MUTEX_TYPE_DEFAULT),
		.notes = { notes_buffer(), notes_buffer() },
		.overflow = linked_list_create(),
		.queue = linked_list_create(),
		.unmatched = array_create(sizeof(xfrmsync_sa_id), 0),
		/* sized for a concentrator: growing rehashes every entry (peer_spis
		 * inside a hook) */
		.children = hashtable_create(hashtable_hash_ptr, hashtable_equals_ptr,
									 4096),
		.sas = hashtable_create(sa_hash, sa_equals, 8192),
		.thresholds = hashtable_create(hashtable_hash_str,
									   hashtable_equals_str, 8),
		.peer_spis = hashtable_create(hashtable_hash_ptr, hashtable_equals_ptr,
									  1024),
		/* the kernel's own defaults, if the sysctls cannot be read */
		.defaults = { .timer_ms = 1000, .replay_packets = 2 },
	);
	if (xfrmsync_netns_defaults_read(NULL, &this->defaults) < 0)
	{
		DBG1(DBG_KNL, "xfrmsync: reading the namespace's threshold defaults "
			 "failed (%s), assuming %u packets/%u ms", xfrmsync_last_error(),
			 this->defaults.replay_packets, this->defaults.timer_ms);
	}
	if (aevents)
	{
		xfrmsync_on_event(aevents, on_event, this);
	}
	xfrmsync_on_applied_rule(registry, on_applied, this);
	DBG2(DBG_KNL, "xfrmsync: libxfrmsync %s, default thresholds %d packets/"
		 "%d ms, aevents %s", xfrmsync_version(),
		 lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.replay_packets", -1, lib->ns),
		 lib->settings->get_int(lib->settings,
						"%s.plugins.xfrmsync.timer_ms", -1, lib->ns),
		 aevents ? "logged" : "not joined (knl log level below 2)");
	return &this->public;
}

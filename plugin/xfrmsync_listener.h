/*
 * The xfrmsync plugin's bus listener: registers each CHILD_SA's two SAs with
 * a libxfrmsync handle, and dispatches that handle from charon's watcher.
 */

/**
 * @defgroup xfrmsync_listener xfrmsync_listener
 * @{ @ingroup xfrmsync
 */

#ifndef XFRMSYNC_LISTENER_H_
#define XFRMSYNC_LISTENER_H_

#include <bus/listeners/listener.h>

typedef struct xfrmsync_listener_t xfrmsync_listener_t;

/**
 * Gives CHILD_SAs their aevent thresholds and logs their aevents.
 */
struct xfrmsync_listener_t {

	/**
	 * Implements listener_t interface.
	 */
	listener_t listener;

	/**
	 * Start or stop dispatching the library's events from charon's watcher.
	 *
	 * @param watch		TRUE to add the library's fd to lib->watcher
	 */
	void (*watch)(xfrmsync_listener_t *this, bool watch);

	/**
	 * Forget what was read from strongswan.conf (settings were reloaded).
	 */
	void (*reload)(xfrmsync_listener_t *this);

	/**
	 * Destroy a xfrmsync_listener_t.
	 */
	void (*destroy)(xfrmsync_listener_t *this);
};

/**
 * Create a xfrmsync_listener_t instance.
 *
 * @return			listener, NULL if the library handle could not be opened
 */
xfrmsync_listener_t *xfrmsync_listener_create();

#endif /** XFRMSYNC_LISTENER_H_ @}*/

/*
 * xfrmsync plugin for strongSwan's charon: gives every CHILD_SA the XFRM
 * aevent thresholds configured under charon.plugins.xfrmsync, through
 * libxfrmsync. See plugin/README.md.
 */

/**
 * @defgroup xfrmsync xfrmsync
 * @ingroup cplugins
 *
 * @defgroup xfrmsync_plugin xfrmsync_plugin
 * @{ @ingroup xfrmsync
 */

#ifndef XFRMSYNC_PLUGIN_H_
#define XFRMSYNC_PLUGIN_H_

#include <plugins/plugin.h>

typedef struct xfrmsync_plugin_t xfrmsync_plugin_t;

/**
 * Plugin giving CHILD_SAs their aevent thresholds.
 */
struct xfrmsync_plugin_t {

	/**
	 * Implements plugin interface.
	 */
	plugin_t plugin;
};

/**
 * Looked up by charon's plugin loader (libstrongswan-xfrmsync.so).
 */
plugin_t *xfrmsync_plugin_create();

#endif /** XFRMSYNC_PLUGIN_H_ @}*/

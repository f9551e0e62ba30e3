/*
 * xfrmsync plugin for strongSwan's charon. It only declares its feature and
 * creates the listener (xfrmsync_listener.c), like strongSwan's counters
 * plugin.
 */

#include "xfrmsync_plugin.h"
#include "xfrmsync_listener.h"

#include <daemon.h>
#include <plugins/plugin_feature.h>

typedef struct private_xfrmsync_plugin_t private_xfrmsync_plugin_t;

/**
 * Private data
 */
struct private_xfrmsync_plugin_t {

	/**
	 * Public interface
	 */
	xfrmsync_plugin_t public;

	/**
	 * Listener implementation
	 */
	xfrmsync_listener_t *listener;
};

METHOD(plugin_t, get_name, char*,
	private_xfrmsync_plugin_t *this)
{
	return "xfrmsync";
}

/**
 * Register the listener on the bus and the library's fd with the watcher
 */
static bool plugin_cb(private_xfrmsync_plugin_t *this,
					  plugin_feature_t *feature, bool reg, void *cb_data)
{
	if (reg)
	{
		charon->bus->add_listener(charon->bus, &this->listener->listener);
		this->listener->watch(this->listener, TRUE);
	}
	else
	{
		this->listener->watch(this->listener, FALSE);
		charon->bus->remove_listener(charon->bus, &this->listener->listener);
	}
	return TRUE;
}

METHOD(plugin_t, get_features, int,
	private_xfrmsync_plugin_t *this, plugin_feature_t *features[])
{
	static plugin_feature_t f[] = {
		PLUGIN_CALLBACK((plugin_feature_callback_t)plugin_cb, NULL),
			PLUGIN_PROVIDE(CUSTOM, "xfrmsync"),
	};
	*features = f;
	return countof(f);
}

METHOD(plugin_t, reload, bool,
	private_xfrmsync_plugin_t *this)
{
	this->listener->reload(this->listener);
	return TRUE;
}

METHOD(plugin_t, destroy, void,
	private_xfrmsync_plugin_t *this)
{
	this->listener->destroy(this->listener);
	free(this);
}

/*
 * Described in header
 */
plugin_t *xfrmsync_plugin_create()
{
	private_xfrmsync_plugin_t *this;
	xfrmsync_listener_t *listener;

	listener = xfrmsync_listener_create();
	if (!listener)
	{
		return NULL;
	}
	INIT(this,
		.public = {
			.plugin = {
				.get_name = _get_name,
				.get_features = _get_features,
				.reload = _reload,
				.destroy = _destroy,
			},
		},
		.listener = listener,
	);

	return &this->public.plugin;
}

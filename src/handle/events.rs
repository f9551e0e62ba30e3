//! Routing of decoded events to the callback registered for their SA, else
//! to the catch-all one. A lookup per event, no allocation.
//!
//! A callback gets a context next to the event (the handle, one layer up),
//! so that it can query and configure SAs from inside dispatch.

use std::collections::HashMap;

use crate::aevent::Aevent;
use crate::sa::SaId;

/// A callback for events, given `Ctx` (the handle that dispatches them).
pub type Callback<Ctx> = Box<dyn FnMut(&Ctx, &Aevent) + Send>;

pub(crate) struct Router<Ctx> {
    per_sa: HashMap<SaId, Callback<Ctx>>,
    any: Option<Callback<Ctx>>,
}

impl<Ctx> Default for Router<Ctx> {
    fn default() -> Self {
        Router {
            per_sa: HashMap::new(),
            any: None,
        }
    }
}

impl<Ctx> Router<Ctx> {
    pub(crate) fn set_sa(&mut self, sa: SaId, callback: Option<Callback<Ctx>>) {
        match callback {
            Some(cb) => {
                self.per_sa.insert(sa, cb);
            }
            None => {
                self.per_sa.remove(&sa);
            }
        }
    }

    pub(crate) fn set_any(&mut self, callback: Option<Callback<Ctx>>) {
        self.any = callback;
    }

    /// Returns whether some callback took the event.
    pub(crate) fn route(&mut self, ctx: &Ctx, event: &Aevent) -> bool {
        if let Some(cb) = self.per_sa.get_mut(&event.sa) {
            cb(ctx, event);
            true
        } else if let Some(cb) = self.any.as_mut() {
            cb(ctx, event);
            true
        } else {
            false
        }
    }
}

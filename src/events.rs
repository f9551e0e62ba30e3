//! Routing of decoded events to the callback registered for their SA, else
//! to the catch-all one. A lookup per event, no allocation.

use std::collections::HashMap;

use crate::aevent::Aevent;
use crate::sa::SaId;

/// A callback for events; runs inside `Handle::dispatch` on its thread.
pub type Callback = Box<dyn FnMut(&Aevent) + Send>;

#[derive(Default)]
pub(crate) struct Router {
    per_sa: HashMap<SaId, Callback>,
    any: Option<Callback>,
}

impl Router {
    pub(crate) fn set_sa(&mut self, sa: SaId, callback: Option<Callback>) {
        match callback {
            Some(cb) => {
                self.per_sa.insert(sa, cb);
            }
            None => {
                self.per_sa.remove(&sa);
            }
        }
    }

    pub(crate) fn set_any(&mut self, callback: Option<Callback>) {
        self.any = callback;
    }

    /// Returns whether some callback took the event.
    pub(crate) fn route(&mut self, event: &Aevent) -> bool {
        if let Some(cb) = self.per_sa.get_mut(&event.sa) {
            cb(event);
            true
        } else if let Some(cb) = self.any.as_mut() {
            cb(event);
            true
        } else {
            false
        }
    }
}

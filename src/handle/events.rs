//! Routing of decoded events to the callback registered for their SA, else
//! to the catch-all one. A lookup per event, no allocation.
//!
//! A callback gets a context next to the event (the handle, one layer up),
//! so that it can query and configure SAs from inside dispatch. It takes
//! either an owned [`Aevent`] (built for it from the message) or an
//! [`AeventView`] read in place (nothing copied: the fast path).

use std::collections::HashMap;

use crate::aevent::Aevent;
use crate::sa::SaId;
use crate::view::AeventView;

/// A callback for events, given `Ctx` (the handle that dispatches them).
pub type Callback<Ctx> = Box<dyn FnMut(&Ctx, &Aevent) + Send>;

/// A callback for events read in place: the view borrows the datagram and
/// lives for the call only (`AeventView::to_aevent` keeps one).
pub type ViewCallback<Ctx> = Box<dyn for<'a> FnMut(&Ctx, &AeventView<'a>) + Send>;

enum Slot<Ctx> {
    Owned(Callback<Ctx>),
    View(ViewCallback<Ctx>),
}

impl<Ctx> Slot<Ctx> {
    fn call(&mut self, ctx: &Ctx, event: &AeventView<'_>) {
        match self {
            Slot::Owned(cb) => cb(ctx, &event.to_aevent()),
            Slot::View(cb) => cb(ctx, event),
        }
    }
}

/// The SA lookup's hasher: keyed per process (SPIs of outbound SAs are the
/// peers' choice), and a few times faster than SipHash on an `SaId`.
type Hasher = std::hash::BuildHasherDefault<crate::handle::fasthash::SaHasher>;

pub(crate) struct Router<Ctx> {
    per_sa: HashMap<SaId, Slot<Ctx>, Hasher>,
    any: Option<Slot<Ctx>>,
}

impl<Ctx> Default for Router<Ctx> {
    fn default() -> Self {
        Router {
            per_sa: HashMap::default(),
            any: None,
        }
    }
}

impl<Ctx> Router<Ctx> {
    fn set(&mut self, sa: SaId, slot: Option<Slot<Ctx>>) {
        match slot {
            Some(slot) => {
                self.per_sa.insert(sa, slot);
            }
            None => {
                self.per_sa.remove(&sa);
            }
        }
    }

    pub(crate) fn set_sa(&mut self, sa: SaId, callback: Option<Callback<Ctx>>) {
        self.set(sa, callback.map(Slot::Owned));
    }

    pub(crate) fn set_sa_view(&mut self, sa: SaId, callback: Option<ViewCallback<Ctx>>) {
        self.set(sa, callback.map(Slot::View));
    }

    pub(crate) fn set_any(&mut self, callback: Option<Callback<Ctx>>) {
        self.any = callback.map(Slot::Owned);
    }

    pub(crate) fn set_any_view(&mut self, callback: Option<ViewCallback<Ctx>>) {
        self.any = callback.map(Slot::View);
    }

    /// Returns whether some callback took the event.
    pub(crate) fn route(&mut self, ctx: &Ctx, event: &AeventView<'_>) -> bool {
        if self.per_sa.is_empty() && self.any.is_none() {
            return false;
        }
        if let Some(cb) = self.per_sa.get_mut(&event.sa()) {
            cb.call(ctx, event);
            true
        } else if let Some(cb) = self.any.as_mut() {
            cb.call(ctx, event);
            true
        } else {
            false
        }
    }
}

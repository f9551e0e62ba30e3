//! Routing of decoded events to the callback registered for their SA, else
//! to the catch-all one. A lookup per event, no allocation.
//!
//! A callback gets a context next to the event (the handle, one layer up),
//! so that it can query and configure SAs from inside dispatch. It takes
//! either an owned [`Aevent`] (built for it from the message) or an
//! [`AeventView`] read in place (nothing copied: the fast path).

use crate::aevent::Aevent;
use crate::handle::fasthash::SaHasher;
use crate::sa::{RouteKey, SaId};
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

/// An SA and its callback, one cache line each: a lookup that finds the
/// key has the callback's pointer too, without a second line or a second
/// indirection (a map of boxed callbacks touches a control group, an entry
/// straddling two lines, then the box).
#[repr(align(64))]
struct Entry<Ctx> {
    key: RouteKey,
    slot: Slot<Ctx>,
}

/// A free index slot.
const EMPTY: u64 = u64::MAX;

/// Callbacks by SA: dense entries, and an open-addressing index of them
/// (linear probing, at most 7/8 full) whose slots hold the entry's
/// position and the top 32 bits of its hash, so that a probe rarely reads
/// an entry that is not the one sought. 8 bytes per slot, 8 slots a line.
///
/// Dispatch looks up a batch of events in steps (see
/// `Handle::dispatch_datagrams`): the hash and a prefetch of its index line
/// as each event is parsed, a prefetch of the entry once the index line is
/// there, then the calls. The waits for memory overlap instead of adding up.
pub(crate) struct Router<Ctx> {
    entries: Vec<Entry<Ctx>>,
    /// A power of two long, or empty.
    slots: Vec<u64>,
    any: Option<Slot<Ctx>>,
    /// The lookup's hasher, keyed per process (SPIs of outbound SAs are
    /// the peers' choice); kept seeded rather than made per event, which
    /// reads the seed through a `OnceLock`.
    hasher: SaHasher,
}

impl<Ctx> Default for Router<Ctx> {
    fn default() -> Self {
        Router { entries: Vec::new(), slots: Vec::new(), any: None, hasher: SaHasher::default() }
    }
}

#[inline]
fn slot_value(hash: u64, index: usize) -> u64 {
    (hash & !0xffff_ffff) | index as u64
}

/// Key equality without a call to `memcmp`, which is what `==` on the
/// array compiles to: a few instructions on the path of every event.
#[inline(always)]
fn same(a: &RouteKey, b: &RouteKey) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4])) == 0
}

/// A hint to bring the line at `p` into the first-level cache.
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64, and a prefetch only hints: it reads
    // nothing into the program and never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl<Ctx> Router<Ctx> {
    #[inline]
    pub(crate) fn hash(&self, key: &RouteKey) -> u64 {
        use std::hash::Hasher as _;
        let mut h = self.hasher;
        for word in key {
            h.write_u64(*word);
        }
        h.finish()
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// Walks the index from `hash`'s slot to the first slot with `hash`'s
    /// tag that `accept` takes (its position and entry), or to the free
    /// slot that ends the run (its position, `None`). The index must not be
    /// empty.
    #[inline(always)]
    fn walk(&self, hash: u64, mut accept: impl FnMut(usize) -> bool) -> (usize, Option<usize>) {
        let mask = self.mask();
        let tag = hash & !0xffff_ffff;
        let mut at = hash as usize & mask;
        loop {
            let slot = self.slots[at];
            if slot == EMPTY {
                return (at, None);
            }
            if slot & !0xffff_ffff == tag {
                let entry = (slot & 0xffff_ffff) as usize;
                if accept(entry) {
                    return (at, Some(entry));
                }
            }
            at = (at + 1) & mask;
        }
    }

    /// The index slot holding `sa` (hashed to `hash`), or the free slot
    /// where it would go. The index must not be empty.
    #[inline]
    fn probe(&self, key: &RouteKey, hash: u64) -> (usize, bool) {
        let (at, entry) = self.walk(hash, |entry| same(&self.entries[entry].key, key));
        (at, entry.is_some())
    }

    #[inline]
    fn find(&self, key: &RouteKey, hash: u64) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        match self.probe(key, hash) {
            (at, true) => Some((self.slots[at] & 0xffff_ffff) as usize),
            _ => None,
        }
    }

    /// First step of a lookup ahead of [`Router::route_keyed`]: bring in
    /// the index line where the probe for `hash` starts.
    #[inline]
    pub(crate) fn prefetch_index(&self, hash: u64) {
        if let Some(slot) = self.slots.get(hash as usize & self.mask()) {
            prefetch(slot);
        }
    }

    /// Second step, once the index line is likely there: bring in the
    /// entry the first slot with `hash`'s tag names, and return it as a
    /// [`Candidate`] for [`Router::route_keyed`], which checks the key.
    #[inline]
    pub(crate) fn prefetch_entry(&self, hash: u64) -> Candidate {
        if self.slots.is_empty() {
            return Candidate::Absent;
        }
        match self.walk(hash, |_| true) {
            (_, Some(index)) => {
                if let Some(entry) = self.entries.get(index) {
                    prefetch(entry);
                }
                Candidate::At(index)
            }
            (_, None) => Candidate::Absent,
        }
    }

    fn rebuild(&mut self, slots: usize) {
        self.slots = vec![EMPTY; slots];
        for i in 0..self.entries.len() {
            let hash = self.hash(&self.entries[i].key);
            let (at, _) = self.probe(&self.entries[i].key, hash);
            self.slots[at] = slot_value(hash, i);
        }
    }

    fn set(&mut self, sa: SaId, slot: Option<Slot<Ctx>>) {
        let key = sa.route_key();
        let hash = self.hash(&key);
        match slot {
            Some(slot) => {
                if let Some(i) = self.find(&key, hash) {
                    self.entries[i].slot = slot;
                    return;
                }
                // Positions are 32 bits in the index; a handle holds no
                // more callbacks than that.
                assert!(self.entries.len() < u32::MAX as usize, "too many SA callbacks");
                if (self.entries.len() + 1) * 8 > self.slots.len() * 7 {
                    self.rebuild((self.slots.len() * 2).max(64));
                }
                let (at, _) = self.probe(&key, hash);
                self.slots[at] = slot_value(hash, self.entries.len());
                self.entries.push(Entry { key, slot });
            }
            None => self.remove(&key, hash),
        }
    }

    fn remove(&mut self, key: &RouteKey, hash: u64) {
        if self.entries.is_empty() {
            return;
        }
        let (at, found) = self.probe(key, hash);
        if !found {
            return;
        }
        let index = (self.slots[at] & 0xffff_ffff) as usize;
        self.unslot(at);
        let last = self.entries.len() - 1;
        if index != last {
            // The last entry moves into the hole: point its slot there.
            let moved = self.hash(&self.entries[last].key);
            let (moved_at, _) = self.probe(&self.entries[last].key, moved);
            self.slots[moved_at] = slot_value(moved, index);
        }
        // Dropped after the index is whole again: a callback's destructor
        // cannot reach the router (it is borrowed), but it may panic.
        drop(self.entries.swap_remove(index));
    }

    /// Frees a slot, shifting back the slots of its probe run (no
    /// tombstones: lookups never probe further than the table's load says).
    fn unslot(&mut self, mut hole: usize) {
        let mask = self.mask();
        self.slots[hole] = EMPTY;
        let mut at = (hole + 1) & mask;
        while self.slots[at] != EMPTY {
            let slot = self.slots[at];
            let home = self.hash(&self.entries[(slot & 0xffff_ffff) as usize].key) as usize & mask;
            // Move it back if its home is not in (hole, at].
            if (at.wrapping_sub(home) & mask) >= (at.wrapping_sub(hole) & mask) {
                self.slots[hole] = slot;
                self.slots[at] = EMPTY;
                hole = at;
            }
            at = (at + 1) & mask;
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

    /// Whether a callback could take any event: without one, dispatch
    /// need not hash events at all.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.any.is_none()
    }

    /// Returns whether some callback took the event.
    #[inline]
    pub(crate) fn route(&mut self, ctx: &Ctx, event: &AeventView<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let key = event.route_key();
        let hash = self.hash(&key);
        self.route_keyed(ctx, event, &key, hash)
    }

    /// [`Router::route`] of an event whose SA is `key`, hashed to `hash`.
    #[inline]
    pub(crate) fn route_keyed(&mut self, ctx: &Ctx, event: &AeventView<'_>, key: &RouteKey, hash: u64) -> bool {
        let found = self.find(key, hash);
        self.call(ctx, event, found)
    }

    /// [`Router::route_keyed`] with what [`Router::prefetch_entry`] found
    /// for `hash`, the router unchanged since: the probe is not repeated
    /// unless the candidate's key is another (tags of 32 bits collide
    /// rarely).
    #[inline]
    pub(crate) fn route_candidate(
        &mut self,
        ctx: &Ctx,
        event: &AeventView<'_>,
        key: &RouteKey,
        hash: u64,
        candidate: Candidate,
    ) -> bool {
        let found = match candidate {
            Candidate::Absent => None,
            Candidate::At(i) if self.entries.get(i).is_some_and(|e| same(&e.key, key)) => Some(i),
            Candidate::At(_) => self.find(key, hash),
        };
        self.call(ctx, event, found)
    }

    #[inline]
    fn call(&mut self, ctx: &Ctx, event: &AeventView<'_>, found: Option<usize>) -> bool {
        if let Some(i) = found {
            self.entries[i].slot.call(ctx, event);
            true
        } else if let Some(cb) = self.any.as_mut() {
            cb.call(ctx, event);
            true
        } else {
            false
        }
    }
}

/// Where a lookup begun ahead points: no SA of the key's hash (then none
/// of its key), or an entry whose hash tag matches.
#[derive(Clone, Copy)]
pub(crate) enum Candidate {
    Absent,
    At(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn sa(n: u32) -> SaId {
        let daddr = if n % 3 == 0 {
            std::net::IpAddr::V6([0x2001, 0xdb8, 0, 0, 0, 0, 0, (n % 7) as u16].into())
        } else {
            std::net::IpAddr::V4([10, 0, 0, (n % 5) as u8].into())
        };
        SaId::esp(daddr, n / 2)
    }

    /// Inserts, replacements and removals in a pseudo-random order, with
    /// every lookup checked against a map: removal shifts probe runs back
    /// and moves the last entry, both easy to get wrong.
    #[test]
    fn lookups_agree_with_a_map_through_inserts_and_removals() {
        let mut router: Router<()> = Router::default();
        let mut model: HashSet<SaId> = HashSet::new();
        let mut x = 12345u32;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let id = sa(x % 3000);
            if x % 4 == 0 {
                router.set_sa_view(id, None);
                model.remove(&id);
            } else {
                router.set_sa_view(id, Some(Box::new(|_, _| {})));
                model.insert(id);
            }
            if step % 997 == 0 || step == 19_999 {
                assert_eq!(router.entries.len(), model.len());
                for n in 0..3000 {
                    let id = sa(n);
                    let key = id.route_key();
                    let hash = router.hash(&key);
                    match router.find(&key, hash) {
                        Some(i) => assert!(router.entries[i].key == key && model.contains(&id), "{id:?}"),
                        None => assert!(!model.contains(&id), "{id:?} lost"),
                    }
                }
            }
        }
    }
}

//! The registry's table of tracked SAs, sized for a concentrator with a
//! million of them: 36 bytes per SA in a dense array, a 4-byte slot per
//! bucket in an open-addressing index (linear probing, at most 7/8 full),
//! thresholds kept once per distinct value. Marked SAs and SAs bound to an
//! XFRM interface (rare) live in an ordinary map beside it. Measured by
//! `benches` (allocator totals): see BENCHMARKS.md.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::net::IpAddr;

use crate::handle::fasthash::SaHasher;
use crate::sa::{Mark, SaId};

use super::rules::{Direction, Thresholds};
use super::Tracked;

const V6: u8 = 1;
const ESN: u8 = 2;
const DIR_IN: u8 = 4;
const DIR_OUT: u8 = 8;
/// Seen by the dump in progress (see [`Table::begin_sweep`]).
const SEEN: u8 = 16;
const EMPTY: u32 = u32::MAX;

/// One tracked SA without mark or interface id: 36 bytes.
#[derive(Clone, Copy)]
struct Entry {
    addr: [u8; 16],
    spi: u32,
    reqid: u32,
    /// The low 32 bits of the install time: enough to tell another SA
    /// under the same identity.
    add_time: u32,
    /// Index + 1 into the interned thresholds; 0: none applied.
    applied: u32,
    proto: u8,
    flags: u8,
}

impl Entry {
    fn key(sa: &SaId) -> ([u8; 16], u32, u8, bool) {
        match sa.daddr {
            IpAddr::V4(a) => {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&a.octets());
                (addr, sa.spi, sa.proto, false)
            }
            IpAddr::V6(a) => (a.octets(), sa.spi, sa.proto, true),
        }
    }

    fn same(&self, key: &([u8; 16], u32, u8, bool)) -> bool {
        self.addr == key.0 && self.spi == key.1 && self.proto == key.2 && (self.flags & V6 != 0) == key.3
    }

    fn sa(&self) -> SaId {
        let daddr = if self.flags & V6 != 0 {
            IpAddr::V6(self.addr.into())
        } else {
            IpAddr::V4([self.addr[0], self.addr[1], self.addr[2], self.addr[3]].into())
        };
        SaId { daddr, spi: self.spi, proto: self.proto, mark: Mark::NONE, if_id: 0 }
    }
}

fn hash_key(key: &([u8; 16], u32, u8, bool)) -> u64 {
    let mut h = BuildHasherDefault::<SaHasher>::default().build_hasher();
    h.write(&key.0);
    h.write_u64((u64::from(key.1) << 16) | (u64::from(key.2) << 8) | u64::from(key.3));
    h.finish()
}

/// Dense entries and an index of their positions.
#[derive(Default)]
struct Compact {
    entries: Vec<Entry>,
    /// Positions into `entries`, `EMPTY` where free; a power of two long.
    slots: Vec<u32>,
}

impl Compact {
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The slot holding `key`, or the free slot where it would go.
    fn probe(&self, key: &([u8; 16], u32, u8, bool)) -> (usize, bool) {
        let mut at = hash_key(key) as usize & self.mask();
        loop {
            match self.slots[at] {
                EMPTY => return (at, false),
                i if self.entries[i as usize].same(key) => return (at, true),
                _ => at = (at + 1) & self.mask(),
            }
        }
    }

    fn find(&self, key: &([u8; 16], u32, u8, bool)) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        match self.probe(key) {
            (slot, true) => Some(self.slots[slot] as usize),
            _ => None,
        }
    }

    fn rebuild(&mut self, slots: usize) {
        self.slots = vec![EMPTY; slots];
        for i in 0..self.entries.len() {
            let key = Entry::key(&self.entries[i].sa());
            let (slot, _) = self.probe(&key);
            self.slots[slot] = i as u32;
        }
    }

    fn insert(&mut self, entry: Entry) {
        // At most 7/8 of the slots in use.
        if (self.entries.len() + 1) * 8 > self.slots.len() * 7 {
            self.rebuild((self.slots.len() * 2).max(64));
        }
        if self.entries.len() == self.entries.capacity() {
            // Half again, not double: the array is most of the memory.
            self.entries.reserve_exact((self.entries.len() / 2).max(64));
        }
        let key = Entry::key(&entry.sa());
        let (slot, found) = self.probe(&key);
        debug_assert!(!found);
        self.slots[slot] = self.entries.len() as u32;
        self.entries.push(entry);
    }

    fn remove(&mut self, key: &([u8; 16], u32, u8, bool)) -> Option<Entry> {
        if self.slots.is_empty() {
            return None;
        }
        let (slot, found) = self.probe(key);
        if !found {
            return None;
        }
        let index = self.slots[slot] as usize;
        self.unslot(slot);
        let last = self.entries.len() - 1;
        if index != last {
            // The last entry moves into the hole: point its slot there.
            let moved = Entry::key(&self.entries[last].sa());
            let (moved_slot, _) = self.probe(&moved);
            self.slots[moved_slot] = index as u32;
        }
        Some(self.entries.swap_remove(index))
    }

    /// Frees a slot, shifting back the entries of its probe run.
    fn unslot(&mut self, mut hole: usize) {
        let mask = self.mask();
        self.slots[hole] = EMPTY;
        let mut at = (hole + 1) & mask;
        while self.slots[at] != EMPTY {
            let i = self.slots[at] as usize;
            let home = hash_key(&Entry::key(&self.entries[i].sa())) as usize & mask;
            // Move it back if its home is not in (hole, at].
            if (at.wrapping_sub(home) & mask) >= (at.wrapping_sub(hole) & mask) {
                self.slots[hole] = i as u32;
                self.slots[at] = EMPTY;
                hole = at;
            }
            at = (at + 1) & mask;
        }
    }

    fn shrink(&mut self) {
        self.entries.shrink_to_fit();
        let mut slots = 64;
        while self.entries.len() * 8 > slots * 7 {
            slots *= 2;
        }
        if slots < self.slots.len() {
            self.rebuild(slots);
        }
    }
}

/// Tracked SAs by identity.
#[derive(Default)]
pub(crate) struct Table {
    compact: Compact,
    /// SAs with a mark or an interface id.
    other: HashMap<SaId, (Entry, u64)>,
    thresholds: Vec<Thresholds>,
    interned: HashMap<Thresholds, u32>,
}

fn plain(sa: &SaId) -> bool {
    !sa.mark.is_set() && sa.if_id == 0
}

impl Table {
    pub(crate) fn len(&self) -> usize {
        self.compact.entries.len() + self.other.len()
    }

    fn intern(&mut self, t: Option<Thresholds>) -> u32 {
        let Some(t) = t else { return 0 };
        if let Some(i) = self.interned.get(&t) {
            return *i;
        }
        self.thresholds.push(t);
        let i = self.thresholds.len() as u32;
        self.interned.insert(t, i);
        i
    }

    fn entry(&mut self, sa: &SaId, t: &Tracked) -> Entry {
        let (addr, spi, proto, v6) = Entry::key(sa);
        let flags = if v6 { V6 } else { 0 }
            | if t.esn { ESN } else { 0 }
            | match t.direction {
                Some(Direction::In) => DIR_IN,
                Some(Direction::Out) => DIR_OUT,
                None => 0,
            };
        Entry { addr, spi, reqid: t.reqid, add_time: t.add_time as u32, applied: self.intern(t.applied), proto, flags }
    }

    fn tracked(&self, e: &Entry, add_time: u64) -> Tracked {
        Tracked {
            reqid: e.reqid,
            esn: e.flags & ESN != 0,
            direction: if e.flags & DIR_IN != 0 {
                Some(Direction::In)
            } else if e.flags & DIR_OUT != 0 {
                Some(Direction::Out)
            } else {
                None
            },
            applied: e.applied.checked_sub(1).map(|i| self.thresholds[i as usize]),
            add_time,
        }
    }

    pub(crate) fn get(&self, sa: &SaId) -> Option<Tracked> {
        if plain(sa) {
            let e = &self.compact.entries[self.compact.find(&Entry::key(sa))?];
            Some(self.tracked(e, u64::from(e.add_time)))
        } else {
            self.other.get(sa).map(|(e, add_time)| self.tracked(e, *add_time))
        }
    }

    /// Whether `add_time` is the install time recorded for `sa`.
    pub(crate) fn same_install(&self, sa: &SaId, add_time: u64) -> bool {
        if plain(sa) {
            self.compact.find(&Entry::key(sa)).is_some_and(|i| self.compact.entries[i].add_time == add_time as u32)
        } else {
            self.other.get(sa).is_some_and(|(_, t)| *t == add_time)
        }
    }

    /// Records `t` for `sa` (seen by the dump in progress, if any).
    pub(crate) fn set(&mut self, sa: &SaId, t: &Tracked) {
        let mut e = self.entry(sa, t);
        e.flags |= SEEN;
        if plain(sa) {
            match self.compact.find(&Entry::key(sa)) {
                Some(i) => self.compact.entries[i] = e,
                None => self.compact.insert(e),
            }
        } else {
            self.other.insert(*sa, (e, t.add_time));
        }
    }

    pub(crate) fn set_applied(&mut self, sa: &SaId, t: Thresholds) {
        let applied = self.intern(Some(t));
        if plain(sa) {
            if let Some(i) = self.compact.find(&Entry::key(sa)) {
                self.compact.entries[i].applied = applied;
            }
        } else if let Some((e, _)) = self.other.get_mut(sa) {
            e.applied = applied;
        }
    }

    pub(crate) fn remove(&mut self, sa: &SaId) {
        if plain(sa) {
            self.compact.remove(&Entry::key(sa));
        } else {
            self.other.remove(sa);
        }
    }

    /// Starts a dump: every SA unseen until [`Table::set`] or
    /// [`Table::seen`] says otherwise.
    pub(crate) fn begin_sweep(&mut self) {
        for e in &mut self.compact.entries {
            e.flags &= !SEEN;
        }
        for (e, _) in self.other.values_mut() {
            e.flags &= !SEEN;
        }
    }

    pub(crate) fn seen(&mut self, sa: &SaId) {
        if plain(sa) {
            if let Some(i) = self.compact.find(&Entry::key(sa)) {
                self.compact.entries[i].flags |= SEEN;
            }
        } else if let Some((e, _)) = self.other.get_mut(sa) {
            e.flags |= SEEN;
        }
    }

    /// Ends a dump: forgets the SAs it did not list, and returns the room
    /// they took.
    pub(crate) fn sweep_unseen(&mut self) {
        let gone: Vec<SaId> = self.compact.entries.iter().filter(|e| e.flags & SEEN == 0).map(Entry::sa).collect();
        for sa in &gone {
            self.compact.remove(&Entry::key(sa));
        }
        self.other.retain(|_, (e, _)| e.flags & SEEN != 0);
        self.compact.shrink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(reqid: u32) -> Tracked {
        Tracked {
            reqid,
            esn: reqid % 2 == 0,
            direction: Some(Direction::Out),
            applied: Some(Thresholds { replay_packets: reqid, timer_ms: 1000 }),
            add_time: 1_700_000_000,
        }
    }

    #[test]
    fn insert_find_remove_many_with_collisions_and_moves() {
        let mut t = Table::default();
        let sas: Vec<SaId> = (0..5000u32)
            .map(|i| {
                let sa = if i % 3 == 0 {
                    SaId::esp(IpAddr::V6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (i % 7) as u8].into()), i)
                } else {
                    SaId::esp(IpAddr::V4([10, 0, 0, (i % 5) as u8].into()), i)
                };
                if i % 97 == 0 {
                    sa.with_mark(i, 0xff)
                } else {
                    sa
                }
            })
            .collect();
        for (i, sa) in sas.iter().enumerate() {
            t.set(sa, &tracked(i as u32));
        }
        assert_eq!(t.len(), sas.len());
        for (i, sa) in sas.iter().enumerate() {
            assert_eq!(t.get(sa), Some(tracked(i as u32)), "{sa}");
        }
        // The same address and SPI in the other family is another SA.
        assert_eq!(t.get(&SaId::esp(IpAddr::V6([0; 16].into()), 1)), None);
        for sa in sas.iter().step_by(2) {
            t.remove(sa);
        }
        for (i, sa) in sas.iter().enumerate() {
            assert_eq!(t.get(sa).is_some(), i % 2 == 1, "{sa}");
        }
        t.begin_sweep();
        for sa in sas.iter().skip(1).step_by(4) {
            t.seen(sa);
        }
        t.sweep_unseen();
        for (i, sa) in sas.iter().enumerate() {
            assert_eq!(t.get(sa), (i % 4 == 1).then(|| tracked(i as u32)), "{sa}");
        }
        assert!(t.same_install(&sas[1], 1_700_000_000) && !t.same_install(&sas[1], 1_700_000_001));
        t.set_applied(&sas[1], Thresholds { replay_packets: 9, timer_ms: 9 });
        assert_eq!(t.get(&sas[1]).unwrap().applied, Some(Thresholds { replay_packets: 9, timer_ms: 9 }));
    }
}

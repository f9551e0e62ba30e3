//! The active node's side of HA sync: a [`SyncRecord`] for an SA whenever
//! the kernel tells of its counters, so that a standby always holds a
//! recent state of every SA.
//!
//! Where records come from:
//! - **aevents**, the kernel's own announcements, rate-limited by each SA's
//!   thresholds; update events this handle caused (the thresholds it sets)
//!   are skipped, they tell nothing new;
//! - **listings** of every SA (`GETSA` dump), read in steps by the
//!   [`Registry`] underneath: at start, every `refresh` period, after the
//!   event socket overran (`ENOBUFS`: events were lost), and when a standby
//!   asks ([`Active::snapshot`]);
//! - **notifications** of new and deleted SAs, so that a standby learns of
//!   an SA before its first packet, and forgets one that is gone.
//!
//! Every synced SA gets thresholds, from the rules given or else the
//! default, because they bound how stale a standby's record can be: at
//! most `replay_packets` packets, or `timer_ms` of traffic, behind.
//!
//! A listing's state can be older than an event already sent (the kernel
//! fills a dump datagram one read ahead): a state whose sequence number is
//! below the last one sent for the same install of the SA is not sent, so
//! a standby never holds a state older than one it had.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::aevent::{Aevent, Lifetime, Replay};
use crate::error::Result;
use crate::handle::{Handle, SaChange};
use crate::registry::{Direction, Observed, Registry, Rule, SaMatch, Thresholds};
use crate::sa::SaId;
use crate::sync::{moving_number, now_ms, SyncRecord};

/// The name of the rule that gives synced SAs the default thresholds; it
/// comes after the caller's rules, so any of them wins.
pub const DEFAULT_RULE: &str = "sync-default";

/// How an active node syncs.
#[derive(Debug, Clone)]
pub struct ActiveConfig {
    /// Thresholds for some SAs, tried in order (the `xfrmsync apply` rules).
    pub rules: Vec<Rule>,
    /// Thresholds for every SA that no rule gives any.
    pub default_thresholds: Thresholds,
    /// Every SA's record is sent again at least this often.
    pub refresh: Duration,
}

impl Default for ActiveConfig {
    /// A standby at most 256 packets or 1 s of traffic behind, and every SA
    /// sent again each 10 s.
    fn default() -> ActiveConfig {
        ActiveConfig {
            rules: Vec::new(),
            default_thresholds: Thresholds { replay_packets: 256, timer_ms: 1000 },
            refresh: Duration::from_secs(10),
        }
    }
}

/// What an active node sends its standby.
#[derive(Debug)]
pub enum Outgoing<'a> {
    /// An SA's latest state.
    Record(&'a SyncRecord),
    /// The SA is gone (deleted, or hard-expired): the standby forgets it.
    Gone(&'a SaId),
}

/// What an active node did, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActiveStats {
    pub records: u64,
    pub from_events: u64,
    pub from_listings: u64,
    pub from_notifications: u64,
    pub gone: u64,
    /// Update events this handle caused.
    pub own_updates: u64,
    /// States older than one already sent.
    pub older_states: u64,
    /// Events of SAs the node has not listed yet (a listing sends them).
    pub unknown_sas: u64,
    /// Listings asked for: at start, each refresh, each snapshot request.
    pub listings: u64,
    /// Times the event socket overran.
    pub events_lost: u64,
    /// Records not sent because the node was replaced.
    pub withheld: u64,
    /// SAs read by [`Active::sample`], and those it could not read.
    pub samples: u64,
    pub samples_failed: u64,
}

/// What the node last sent of an SA, and its traffic rate.
#[derive(Debug, Clone, Copy)]
struct Sent {
    add_time: u64,
    number: u64,
    /// The rate sample's start: its time and the number then.
    sample_ms: u64,
    sample_number: u64,
    rate_per_ks: u64,
}

/// A rate sample shorter than this is not taken alone: with the events of
/// a fast SA a few ms apart, a sample would be mostly noise.
const RATE_SAMPLE_MIN_MS: u64 = 200;
/// An old peak rate halves in this time, so that the estimate follows a
/// falling rate but a burst is not forgotten at once.
const RATE_HALF_LIFE_MS: f64 = 60_000.0;

/// Events the handle's callback took, for [`Active::dispatch`] to turn into
/// records once the registry has taken in the notifications of the same
/// read.
#[derive(Default)]
struct EventQueue {
    events: Vec<Aevent>,
    own_updates: u64,
}

/// The active node's side of sync, on a handle of its own.
pub struct Active {
    registry: Registry,
    queue: Arc<Mutex<EventQueue>>,
    sent: HashMap<SaId, Sent>,
    epoch: u64,
    /// The counter of the last record; see [`Active::next_counter`].
    counter: u64,
    refresh: Duration,
    next_refresh: Instant,
    replaced_by: Option<u64>,
    stats: ActiveStats,
    /// SAs still to sample in this round of [`Active::sample`].
    to_sample: Vec<SaId>,
}

impl Active {
    /// Syncs every SA of `handle`'s namespace at `epoch`. The first
    /// [`Active::dispatch`] calls list every SA, so the standby gets a
    /// snapshot.
    pub fn new(handle: Handle, epoch: u64, config: ActiveConfig) -> Result<Active> {
        handle.subscribe(true)?;
        let queue = Arc::new(Mutex::new(EventQueue::default()));
        let taken = Arc::clone(&queue);
        handle.on_event(Some(Box::new(move |handle: &Handle, event: &Aevent| {
            // A poisoned lock only means a panic elsewhere mid-push; the
            // queue itself is still whole.
            let mut queue = taken.lock().unwrap_or_else(|e| e.into_inner());
            if handle.caused(event) {
                queue.own_updates += 1;
            } else {
                queue.events.push(*event);
            }
        })))?;
        let registry = Registry::new(handle);
        // The active node knows which SAs it sends on (the service address
        // is its own); a standby, before takeover, may not.
        registry.learn_directions()?;
        let mut rules = config.rules;
        rules.retain(|r| r.name != DEFAULT_RULE);
        rules.push(Rule {
            name: DEFAULT_RULE.into(),
            matches: SaMatch::default(),
            thresholds: config.default_thresholds,
        });
        registry.set_rules(rules)?;
        registry.list_again()?;
        Ok(Active {
            registry,
            queue,
            sent: HashMap::new(),
            epoch,
            counter: 0,
            refresh: config.refresh,
            next_refresh: Instant::now() + config.refresh,
            replaced_by: None,
            stats: ActiveStats { listings: 1, ..ActiveStats::default() },
            to_sample: Vec::new(),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn stats(&self) -> ActiveStats {
        self.stats
    }

    /// Sends every SA again, in steps, from the next dispatch on: for a
    /// standby that (re)joined.
    pub fn snapshot(&mut self) -> Result<()> {
        self.stats.listings += 1;
        self.registry.list_again()
    }

    /// When [`Active::dispatch`] should be called even if the event fd is
    /// quiet: a listing step, or the periodic refresh.
    pub fn next_due(&self) -> Instant {
        self.registry.relist_due().map_or(self.next_refresh, |due| due.min(self.next_refresh))
    }

    /// Reads what the kernel announced and hands each record or departure
    /// to `out`. [`crate::Error::EventsLost`] says the event socket overran:
    /// a listing is under way that sends every SA again, and the caller
    /// need do nothing more.
    pub fn dispatch(&mut self, out: &mut dyn FnMut(Outgoing<'_>)) -> Result<usize> {
        if Instant::now() >= self.next_refresh {
            self.next_refresh = Instant::now() + self.refresh;
            self.stats.listings += 1;
            self.registry.list_again()?;
        }
        let withhold = self.replaced_by.is_some();
        let (epoch, sent, counter, stats) = (self.epoch, &mut self.sent, &mut self.counter, &mut self.stats);
        let dispatched = self.registry.dispatch_observing(&mut |seen: &Observed<'_>| {
            if withhold {
                stats.withheld += 1;
                return;
            }
            match seen.change {
                SaChange::Deleted | SaChange::Expired { hard: true } => {
                    if sent.remove(&seen.info.sa).is_some() || !seen.listed {
                        stats.gone += 1;
                        out(Outgoing::Gone(&seen.info.sa));
                    }
                }
                SaChange::Expired { hard: false } => {}
                SaChange::New | SaChange::Updated => {
                    let info = seen.info;
                    let (Some(replay), Some(lifetime)) = (info.replay, info.lifetime) else { return };
                    if info.sa.spi == 0 {
                        return;
                    }
                    let state = State {
                        sa: info.sa,
                        saddr: info.saddr.unwrap_or_else(|| unspecified_like(&info.sa.daddr)),
                        reqid: info.reqid,
                        direction: seen.direction,
                        esn: info.esn(),
                        replay,
                        lifetime,
                        thresholds: seen.thresholds,
                    };
                    if let Some(record) = state.record(sent, counter, epoch, stats) {
                        match seen.listed {
                            true => stats.from_listings += 1,
                            false => stats.from_notifications += 1,
                        }
                        out(Outgoing::Record(&record));
                    }
                }
            }
        });
        let events = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            self.stats.own_updates += std::mem::take(&mut queue.own_updates);
            std::mem::take(&mut queue.events)
        };
        for event in &events {
            if withhold {
                self.stats.withheld += 1;
                continue;
            }
            let Some(tracked) = self.registry.tracked(&event.sa) else {
                self.stats.unknown_sas += 1;
                continue;
            };
            let state = State {
                sa: event.sa,
                saddr: event.saddr,
                reqid: event.reqid,
                direction: tracked.direction.or_else(|| self.registry.learn_direction(&event.sa, event.saddr)),
                esn: tracked.esn,
                replay: event.replay,
                lifetime: event.lifetime,
                thresholds: tracked.applied,
            };
            if let Some(record) = state.record(&mut self.sent, &mut self.counter, self.epoch, &mut self.stats) {
                self.stats.from_events += 1;
                out(Outgoing::Record(&record));
            }
        }
        if matches!(dispatched, Err(crate::Error::EventsLost)) {
            self.stats.events_lost += 1;
        }
        dispatched
    }

    /// The kernel's state now of up to `count` SAs this node has sent
    /// records of, taken in turn so that successive calls go round every
    /// one: for a standby to measure how far behind its records are
    /// ([`crate::sync::Standby::lag`]). Between two records an SA moves by
    /// up to its replay threshold, or a timer period of traffic; only a
    /// fresh read of the kernel shows how much.
    ///
    /// Samples are records in form, stamped with the node's epoch and its
    /// last counter (never a new one): they are for measuring, not holding.
    /// An SA that cannot be read, or was installed again since its last
    /// record, is skipped. A replaced node samples nothing.
    pub fn sample(&mut self, count: usize) -> Vec<SyncRecord> {
        let mut samples = Vec::new();
        if self.replaced_by.is_some() {
            return samples;
        }
        while samples.len() < count {
            if self.to_sample.is_empty() {
                self.to_sample = self.sent.keys().copied().collect();
                // At most one round a call: an SA is not read twice.
                if self.to_sample.is_empty() || !samples.is_empty() {
                    break;
                }
            }
            let Some(sa) = self.to_sample.pop() else { break };
            let (Some(sent), Some(tracked)) = (self.sent.get(&sa), self.registry.tracked(&sa)) else { continue };
            let event = match self.registry.handle().query(&sa) {
                Ok(event) if event.lifetime.add_time == sent.add_time => event,
                Ok(_) => continue,
                Err(e) => {
                    log::debug!("sampling {sa}: {e}");
                    self.stats.samples_failed += 1;
                    continue;
                }
            };
            self.stats.samples += 1;
            let state = State {
                sa,
                saddr: event.saddr,
                reqid: event.reqid,
                direction: tracked.direction,
                esn: tracked.esn,
                replay: event.replay,
                lifetime: event.lifetime,
                thresholds: tracked.applied,
            };
            samples.push(state.as_record(self.epoch, self.counter, now_ms(), sent.rate_per_ks));
        }
        samples
    }

    /// Learns that some node holds `epoch`. A higher one than this node's
    /// means a standby committed: this node was replaced, and from now on
    /// sends no record (two nodes sending on one SA reuse its sequence
    /// numbers, and with GCM its nonces). Returns whether this call is the
    /// one that learned it.
    pub fn learn_epoch(&mut self, epoch: u64) -> bool {
        if epoch <= self.epoch || self.replaced_by.is_some_and(|by| by >= epoch) {
            return false;
        }
        let first = self.replaced_by.is_none();
        self.replaced_by = Some(epoch);
        if first {
            log::error!(
                "another node took over at epoch {epoch} (this node's is {}): this node was replaced and sends no \
                 more records",
                self.epoch
            );
        }
        first
    }

    /// Moves this node's epoch up to `epoch` without a takeover: a standby
    /// knew a higher epoch than the one this node committed at (it had seen
    /// it before this node's state file did, or committed itself once and
    /// restarted), and would refuse every record of the lower one. Records
    /// from now on carry `epoch`. Refused (false) once replaced, or if
    /// `epoch` is not higher.
    pub fn raise_epoch(&mut self, epoch: u64) -> bool {
        if epoch <= self.epoch || self.replaced_by.is_some() {
            return false;
        }
        self.epoch = epoch;
        true
    }

    /// The higher epoch that replaced this node, once learned.
    pub fn replaced_by(&self) -> Option<u64> {
        self.replaced_by
    }

    /// Deletes every outbound SA of the namespace, so that a replaced node
    /// cannot send on an SA the new active one sends on. Each SA's result is
    /// returned; an SA whose direction is not known is left.
    pub fn delete_outbound(&self) -> Result<Vec<(SaId, Result<()>)>> {
        let handle = self.registry.handle();
        let local = handle.local_addresses()?;
        let mut outbound = Vec::new();
        handle.dump_sas(|info| {
            if Direction::of_sa(info.direction, info.saddr, info.sa.daddr, &local) == Some(Direction::Out) {
                outbound.push(info.sa);
            }
        })?;
        let deleted = outbound.into_iter().map(|sa| (sa, handle.delete_sa(&sa))).collect();
        Ok(deleted)
    }
}

/// An SA's state as an event, notification or listing told it.
struct State {
    sa: SaId,
    saddr: IpAddr,
    reqid: u32,
    direction: Option<Direction>,
    esn: bool,
    replay: Replay,
    lifetime: Lifetime,
    thresholds: Option<Thresholds>,
}

impl State {
    /// The record to send, unless the state is older than one sent; the
    /// SA's rate estimate moves on with it.
    fn record(
        &self,
        sent: &mut HashMap<SaId, Sent>,
        counter: &mut u64,
        epoch: u64,
        stats: &mut ActiveStats,
    ) -> Option<SyncRecord> {
        let now = now_ms();
        let number = moving_number(&self.replay, self.direction);
        let add_time = self.lifetime.add_time;
        let rate_per_ks = match sent.get_mut(&self.sa) {
            Some(last) if last.add_time == add_time => {
                if number < last.number {
                    stats.older_states += 1;
                    return None;
                }
                last.number = number;
                last.advance_rate(now, number);
                last.rate_per_ks
            }
            // New, or another install under the same identity: its numbers
            // start again.
            _ => {
                let first = Sent { add_time, number, sample_ms: now, sample_number: number, rate_per_ks: 0 };
                sent.insert(self.sa, first);
                0
            }
        };
        stats.records += 1;
        Some(self.as_record(epoch, next_counter(counter), now, rate_per_ks))
    }

    /// The state as a record of `epoch` and `counter`, read at `now` (ms
    /// since the Unix epoch).
    fn as_record(&self, epoch: u64, counter: u64, now: u64, rate_per_ks: u64) -> SyncRecord {
        SyncRecord {
            sa: self.sa,
            saddr: self.saddr,
            reqid: self.reqid,
            direction: self.direction,
            esn: self.esn,
            replay: self.replay,
            lifetime_bytes: self.lifetime.bytes,
            lifetime_packets: self.lifetime.packets,
            thresholds: self.thresholds,
            epoch,
            counter,
            sent_at_ms: now,
            rate_per_ks,
        }
    }
}

impl Sent {
    /// Takes a sample once it spans long enough: the estimate is the
    /// sample's rate or the old one decayed, whichever is higher, so a
    /// standby's margin covers a burst that has just ended.
    fn advance_rate(&mut self, now: u64, number: u64) {
        let span = now.saturating_sub(self.sample_ms);
        if span < RATE_SAMPLE_MIN_MS {
            return;
        }
        // packets per ms is packets per 1,000 s times 10^-6
        let sampled = number.saturating_sub(self.sample_number).saturating_mul(1_000_000) / span;
        let decayed = (self.rate_per_ks as f64 * 0.5f64.powf(span as f64 / RATE_HALF_LIFE_MS)) as u64;
        self.rate_per_ks = sampled.max(decayed);
        self.sample_ms = now;
        self.sample_number = number;
    }
}

/// Record counters rise within an epoch even across restarts of the
/// node: each is at least the wall clock in microseconds, so a restarted
/// node's first record supersedes what its previous run sent.
fn next_counter(counter: &mut u64) -> u64 {
    let clock = now_ms().saturating_mul(1000);
    *counter = (*counter + 1).max(clock);
    *counter
}

fn unspecified_like(addr: &IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

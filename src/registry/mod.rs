//! Thresholds given to SAs as they appear: per-SA registrations and rules
//! ([`rules`]), applied by a [`Registry`] on top of a [`Handle`].
//!
//! The registry watches the namespace's SA notifications inside its own
//! [`Registry::dispatch`], with no thread: each `NEWSA`/`UPDSA` gets its
//! thresholds, `DELSA` and hard `EXPIRE` forget the SA. It lists every SA
//! (`GETSA` dump) when the first rule arrives, on every rule change, and
//! after lost notifications (`ENOBUFS`), so no SA stays on the namespace
//! defaults because a notification went missing. What it applies goes out
//! in batches, every acknowledgement checked, and each result reaches the
//! `on_applied` callback.
//!
//! An SA that no rule matches any more keeps the thresholds it has: the
//! registry does not know what it had before.

pub mod rules;
mod table;

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::handle::{Handle, ListingStep, SaChange, SaNotice};
use crate::sa::SaId;
use crate::wire::SaInfo;

pub use rules::{Direction, Prefix, Rule, RuleSet, SaFacts, SaMatch, Source, Thresholds};

/// Applications sent per batch of [`Handle::set_thresholds_many`] calls.
const APPLY_CHUNK: usize = 4096;

/// What the registry knows of an SA it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracked {
    pub reqid: u32,
    /// Installed with extended sequence numbers (`XFRM_STATE_ESN`): only
    /// then do its sequence numbers go past 2^32.
    pub esn: bool,
    pub direction: Option<Direction>,
    /// The thresholds the registry applied and the kernel acknowledged.
    pub applied: Option<Thresholds>,
    /// The SA's install time: a different one is another SA under the same
    /// identity, which needs its thresholds again.
    add_time: u64,
}

/// One application's outcome, for the `on_applied` callback.
#[derive(Debug)]
pub struct Applied<'a> {
    pub sa: &'a SaId,
    pub thresholds: Thresholds,
    /// The rule that gave them; `None` when they were registered for this
    /// SA ([`Registry::register_sa`]).
    pub rule: Option<&'a str>,
    pub result: &'a Result<()>,
}

/// An SA to give thresholds to, and the rule they come from: its place in
/// the [`Batch`]'s names, or [`REGISTERED`]. A plain `u32`, not an
/// `Option`, keeps a resync of a million SAs 4 bytes an SA smaller.
struct Pending {
    sa: SaId,
    thresholds: Thresholds,
    rule: u32,
}

/// [`Pending::rule`] of thresholds registered for the SA itself.
const REGISTERED: u32 = u32::MAX;

/// SAs to apply to, with the names of the rules in force when they were
/// chosen: an `on_applied` callback may change the rules before the last
/// of them is reported.
#[derive(Default)]
struct Batch {
    pending: Vec<Pending>,
    rule_names: Vec<String>,
}

impl Batch {
    /// `pending` as chosen under `rules`. The names are copied only when
    /// there is something to apply: most dispatches bring no new SA.
    fn new(pending: Vec<Pending>, rules: &RuleSet) -> Batch {
        let rule_names =
            if pending.is_empty() { Vec::new() } else { rules.rules().iter().map(|r| r.name.clone()).collect() };
        Batch { pending, rule_names }
    }
}

/// An SA the registry learned of, handed to the observer of
/// [`Registry::dispatch_observing`]: how the HA sync engine learns of every
/// SA, its state, and its thresholds without a listing of its own.
#[derive(Debug)]
pub struct Observed<'a> {
    pub info: &'a SaInfo,
    pub change: SaChange,
    /// Listed by a dump, rather than announced by the kernel.
    pub listed: bool,
    pub direction: Option<Direction>,
    /// What the rules give the SA: applied already, or in this call.
    pub thresholds: Option<Thresholds>,
}

/// Learns of each application; runs inside the registry's calls, on their
/// thread.
pub type AppliedCallback = Box<dyn FnMut(&Handle, &Applied<'_>) + Send>;

#[derive(Default)]
struct State {
    rules: RuleSet,
    tracked: table::Table,
    local: Vec<IpAddr>,
    watching: bool,
    on_applied: Option<AppliedCallback>,
    /// A listing of every SA the registry owes (SA notifications were lost,
    /// or a listing failed), kept until one succeeds.
    relist: Option<Owed>,
    /// A listing in steps that runs (see [`Registry::dispatch`]).
    listing: Option<StepListing>,
    /// Learn every SA's direction, whether or not a rule needs it (see
    /// [`Registry::learn_directions`]).
    directions: bool,
    /// When [`Registry::learn_direction`] last read the local addresses.
    local_read_at: Option<Instant>,
}

/// How often [`Registry::learn_direction`] may read the local addresses
/// again (a netlink dump) while some SA's direction is unknown.
pub const LOCAL_ADDRESSES_REFRESH: Duration = Duration::from_secs(1);

/// A listing read a few datagrams per dispatch call.
#[derive(Debug, Clone, Copy)]
struct StepListing {
    /// Whether forgetting the SAs it did not list still holds at its end: a
    /// whole listing made meanwhile (a rule change) began a sweep of its own.
    sweep: bool,
    /// Failed attempts before this one, for the backoff if it fails too.
    failures: u32,
}

/// Datagrams of a listing read per dispatch call. The kernel fills a dump
/// datagram up to 32 KiB, about 100 SAs: so a call lists at most some 800
/// SAs, and gives those that lack them their thresholds.
pub const LISTING_STEP: usize = 8;

impl State {
    /// Whether SAs' directions must be learned (from the namespace's
    /// addresses, where the kernel does not say).
    fn wants_direction(&self) -> bool {
        self.directions || self.rules.needs_direction()
    }

    /// A listing failed, after `failures` that failed before it (the owed
    /// one it served is no longer in `relist`): owed again after a longer
    /// wait, or sooner if a loss meanwhile owes one already.
    fn listing_failed(&mut self, failures: u32) {
        let failures = failures + 1;
        let due = Instant::now() + relist_wait(failures);
        self.relist = Some(Owed { due: self.relist.map_or(due, |o| o.due.min(due)), failures });
    }
}

/// When an owed listing is tried next, and how many attempts failed.
#[derive(Debug, Clone, Copy)]
struct Owed {
    due: Instant,
    failures: u32,
}

/// Waits between attempts at an owed listing: doubling from the first, up
/// to the last, so a kernel that refuses for minutes (out of memory, a
/// namespace going away) is asked twice a minute, not in a loop.
const RELIST_FIRST_WAIT: Duration = Duration::from_millis(100);
const RELIST_MAX_WAIT: Duration = Duration::from_secs(30);

fn relist_wait(failures: u32) -> Duration {
    RELIST_FIRST_WAIT.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(RELIST_MAX_WAIT)
}

/// A handle that gives SAs their thresholds as they appear.
pub struct Registry {
    handle: Handle,
    state: RefCell<State>,
    /// A public call is in progress: an `on_applied` callback that calls
    /// back in (C code can) gets [`Error::Busy`] rather than a nested
    /// listing or dispatch.
    entered: Cell<bool>,
}

/// Leaves the registry's public call, on unwind too.
struct Entered<'a>(&'a Cell<bool>);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl Registry {
    /// Wraps `handle`. Nothing is watched until the first rule or
    /// registration arrives.
    pub fn new(handle: Handle) -> Registry {
        Registry { handle, state: RefCell::new(State::default()), entered: Cell::new(false) }
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    fn enter(&self) -> Result<Entered<'_>> {
        if self.entered.replace(true) {
            return Err(Error::Busy("the registry is in use (called from its own callback?)"));
        }
        Ok(Entered(&self.entered))
    }

    fn state(&self) -> Result<std::cell::RefMut<'_, State>> {
        self.state.try_borrow_mut().map_err(|_| Error::Busy("the registry is in use (called from its own callback?)"))
    }

    /// Adds a rule, or replaces the one of the same name, then applies the
    /// rules to every SA there is.
    pub fn add_rule(&self, rule: Rule) -> Result<()> {
        let _entered = self.enter()?;
        self.state()?.rules.add(rule);
        self.rules_changed()
    }

    /// Removes the rule named `name` (whether there was one), then applies
    /// the rules again.
    pub fn remove_rule(&self, name: &str) -> Result<bool> {
        let _entered = self.enter()?;
        let removed = self.state()?.rules.remove(name);
        self.rules_changed()?;
        Ok(removed)
    }

    /// Replaces every rule at once (a reloaded rules file).
    pub fn set_rules(&self, rules: Vec<Rule>) -> Result<()> {
        let _entered = self.enter()?;
        self.state()?.rules.replace_rules(rules);
        self.rules_changed()
    }

    /// Gives exactly this SA these thresholds, before all rules; `None`
    /// lets one registration go. Registrations are counted: the SA keeps
    /// its thresholds until as many `None` as `Some` have come, and the
    /// latest `Some` says which thresholds.
    ///
    /// Only this SA is touched (no listing, unless this is the first rule or
    /// registration): a daemon registers each SA it installs. An SA that is
    /// not installed yet, or is still a placeholder from SPI allocation
    /// (the kernel answers `ESRCH` or `EINVAL`), gets its thresholds when
    /// the kernel announces it.
    ///
    /// An error means nothing was registered. Once registered, the SA's
    /// thresholds are the registry's to deliver: if the kernel cannot be
    /// asked now, a listing is owed and retried (see
    /// [`Registry::relist_due`]), with a warning in the log.
    pub fn register_sa(&self, sa: SaId, thresholds: Option<Thresholds>) -> Result<()> {
        let _entered = self.enter()?;
        let first = {
            let mut state = self.state()?;
            state.rules.register_sa(sa, thresholds);
            !state.watching
        };
        let Some(t) = thresholds else { return Ok(()) };
        if first {
            if let Err(e) = self.start_watching() {
                // Undone, so that a caller that takes the error as "not
                // registered" leaves no entry behind for a later SA of this
                // identity to inherit.
                self.state()?.rules.register_sa(sa, None);
                return Err(e);
            }
            return self.relist_or_owe();
        }
        let mut result = Ok(());
        if let Err(e) = self.handle.set_thresholds_many(&[(sa, t.replay_packets, t.timer_ms)], |_, r| result = r) {
            log::warn!("thresholds for {sa}: {e}; every SA will be listed again");
            self.owe_relist(Instant::now(), 1)?;
            return Ok(());
        }
        match result {
            Err(Error::Kernel { errno, .. }) if errno == libc::ESRCH || errno == libc::EINVAL => Ok(()),
            other => {
                match &other {
                    Ok(()) => self.state()?.tracked.set_applied(&sa, t),
                    Err(e) if transient(e) => self.owe_relist(Instant::now() + relist_wait(1), 1)?,
                    Err(_) => {}
                }
                self.report(&[Pending { sa, thresholds: t, rule: REGISTERED }], &[], vec![Some(other)])
            }
        }
    }

    /// Learns every SA's direction from now on ([`Tracked::direction`],
    /// [`Observed::direction`]), even where no rule needs it: an HA sync
    /// record carries it, for a standby whose addresses do not tell.
    pub fn learn_directions(&self) -> Result<()> {
        self.state()?.directions = true;
        Ok(())
    }

    /// The direction of a tracked SA whose direction was not known when it
    /// was first seen, from the local addresses now (read again at most
    /// once per [`LOCAL_ADDRESSES_REFRESH`]): a cluster manager adds the
    /// service address after the takeover, so the SAs listed at the takeover
    /// learn theirs only then. Kept once learnt; `None` while no address
    /// tells, or for an SA the registry does not track.
    pub fn learn_direction(&self, sa: &SaId, saddr: IpAddr) -> Option<Direction> {
        let mut state = self.state().ok()?;
        let known = state.tracked.get(sa)?;
        if known.direction.is_some() {
            return known.direction;
        }
        if !matches!(state.local_read_at, Some(at) if at.elapsed() < LOCAL_ADDRESSES_REFRESH) {
            state.local_read_at = Some(Instant::now());
            match self.handle.local_addresses() {
                Ok(local) => state.local = local,
                Err(e) => log::warn!("listing local addresses: {e}"),
            }
        }
        let direction = Direction::of_sa(None, Some(saddr), sa.daddr, &state.local)?;
        state.tracked.set(sa, &Tracked { direction: Some(direction), ..known });
        Some(direction)
    }

    /// How many owners have registered `sa` (see [`Registry::register_sa`]).
    pub fn registrations(&self, sa: &SaId) -> u32 {
        self.state.borrow().rules.owners(sa)
    }

    /// The rules, in the order they are tried.
    pub fn rules(&self) -> Vec<Rule> {
        self.state.borrow().rules.rules().to_vec()
    }

    pub fn on_applied(&self, callback: Option<AppliedCallback>) -> Result<()> {
        self.state()?.on_applied = callback;
        Ok(())
    }

    /// What the registry knows of `sa`.
    pub fn tracked(&self, sa: &SaId) -> Option<Tracked> {
        self.state.borrow().tracked.get(sa)
    }

    /// How many SAs the registry tracks.
    pub fn tracked_count(&self) -> usize {
        self.state.borrow().tracked.len()
    }

    /// The thresholds the rules give an SA described by `facts`.
    pub fn thresholds_for(&self, facts: &SaFacts) -> Option<Thresholds> {
        self.state.borrow().rules.resolve(facts).map(|(_, t)| t)
    }

    /// Facts of an SA as the kernel describes it, its direction included.
    pub fn facts(&self, info: &SaInfo) -> Result<SaFacts> {
        let mut state = self.state()?;
        if state.wants_direction() && info.direction.is_none() && state.local.is_empty() {
            state.local = self.handle.local_addresses()?;
        }
        Ok(facts_of(info, &state.local))
    }

    fn rules_changed(&self) -> Result<()> {
        if !self.state.borrow().watching {
            if self.state.borrow().rules.is_empty() {
                return Ok(());
            }
            self.start_watching()?;
        }
        self.relist(&mut |_| {})
    }

    fn start_watching(&self) -> Result<()> {
        self.handle.watch_sas(true)?;
        self.state()?.watching = true;
        Ok(())
    }

    /// A listing that fails is owed, and the error logged rather than
    /// returned: for a registration, which is in force either way.
    fn relist_or_owe(&self) -> Result<()> {
        if let Err(e) = self.relist(&mut |_| {}) {
            let wait = self.relist_due().map(|at| at.saturating_duration_since(Instant::now()));
            log::warn!("listing every SA: {e}; trying again in {wait:?}");
        }
        Ok(())
    }

    /// When an owed listing of every SA is due (SA notifications were lost
    /// and the listing after it failed, or a registration could not reach
    /// the kernel); `None` when none is owed. [`Registry::dispatch`] tries
    /// it when it is due, so a caller that waits for the event fd should
    /// wait no longer than this.
    pub fn relist_due(&self) -> Option<Instant> {
        // Inside a dispatch (a callback asking) the state is in use; that
        // dispatch does what is due.
        let state = self.state.try_borrow().ok()?;
        // A listing in steps: the next step is due at once.
        if state.listing.is_some() {
            return Some(Instant::now());
        }
        state.relist.map(|owed| owed.due)
    }

    /// How many attempts at the owed listing failed in a row (0: none owed,
    /// or none failed yet).
    pub fn relist_failures(&self) -> u32 {
        self.state.try_borrow().map_or(0, |state| state.relist.map_or(0, |owed| owed.failures))
    }

    fn owe_relist(&self, due: Instant, failures: u32) -> Result<()> {
        let mut state = self.state()?;
        let failures = failures.max(state.relist.map_or(0, |o| o.failures));
        state.relist = Some(Owed { due: state.relist.map_or(due, |o| o.due.min(due)), failures });
        Ok(())
    }

    /// Lists every SA and applies the rules where an SA lacks its
    /// thresholds; forgets SAs that are gone. What a listing that fails
    /// partway did list still gets its thresholds; the listing is then owed
    /// (see [`Registry::relist_due`]) and the error returned.
    pub fn resync(&self) -> Result<()> {
        let _entered = self.enter()?;
        self.relist(&mut |_| {})
    }

    /// Owes a listing of every SA from now: the next
    /// [`Registry::dispatch_observing`] calls list it, in steps where the
    /// handle can, and hand each listed SA to their observer (a sync
    /// snapshot).
    pub fn list_again(&self) -> Result<()> {
        let _entered = self.enter()?;
        if !self.state()?.watching {
            self.start_watching()?;
        }
        self.owe_relist(Instant::now(), 0)
    }

    fn relist(&self, observer: &mut dyn FnMut(&Observed<'_>)) -> Result<()> {
        let outcome = self.list_and_apply(observer);
        let mut state = self.state()?;
        match &outcome {
            Ok(()) => state.relist = None,
            Err(_) => {
                let failures = state.relist.take().map_or(0, |o| o.failures);
                state.listing_failed(failures);
            }
        }
        outcome
    }

    fn list_and_apply(&self, observer: &mut dyn FnMut(&Observed<'_>)) -> Result<()> {
        let (batch, listed) = {
            let mut state = self.state()?;
            // This listing's sweep is the one that counts now.
            if let Some(listing) = state.listing.as_mut() {
                listing.sweep = false;
            }
            let mut pending = Vec::new();
            if state.wants_direction() {
                state.local = self.handle.local_addresses()?;
            }
            // Mark and sweep: what the dump lists is marked seen, the rest
            // forgotten, only once the whole dump arrived.
            state.tracked.begin_sweep();
            let listed = self
                .handle
                .dump_sas(|info| observe_and_tell(&mut state, SaChange::New, true, info, &mut pending, &mut *observer));
            if listed.is_ok() {
                state.tracked.sweep_unseen();
            }
            (Batch::new(pending, &state.rules), listed)
        };
        let applied = self.apply(batch);
        listed.and(applied)
    }

    /// Dispatches the handle's events (see [`Handle::dispatch`]) and gives
    /// SAs that appeared their thresholds. After lost notifications it lists
    /// every SA again, then returns [`Error::EventsLost`] whether or not the
    /// listing succeeded (which also tells the caller that aevents were
    /// lost); a listing that failed is owed, and tried again by a later
    /// call once [`Registry::relist_due`] has come.
    pub fn dispatch(&self) -> Result<usize> {
        self.dispatch_observing(&mut |_| {})
    }

    /// [`Registry::dispatch`], handing `observer` every SA announced or
    /// listed meanwhile, after the registry took it in.
    pub fn dispatch_observing(&self, observer: &mut dyn FnMut(&Observed<'_>)) -> Result<usize> {
        let _entered = self.enter()?;
        let (batch, dispatched) = {
            let mut state = self.state()?;
            let mut pending = Vec::new();
            let mut refreshed = false;
            let dispatched = self.handle.dispatch_with(&mut |handle: &Handle, notice: &SaNotice| {
                let info = &notice.info;
                let unknown_direction =
                    state.wants_direction() && info.direction.is_none() && direction_of(info, &state.local).is_none();
                if unknown_direction && !refreshed {
                    // A new address (MOBIKE, a new link): learn it once per call.
                    refreshed = true;
                    match handle.local_addresses() {
                        Ok(local) => state.local = local,
                        Err(e) => log::warn!("listing local addresses: {e}"),
                    }
                }
                observe_and_tell(&mut state, notice.change, false, info, &mut pending, &mut *observer);
            });
            (Batch::new(pending, &state.rules), dispatched)
        };
        let applied = self.apply(batch);
        if applied.is_err() {
            // What did not reach the kernel is found again by a listing.
            self.owe_relist(Instant::now() + relist_wait(1), 1)?;
        }
        let lost = matches!(dispatched, Err(Error::EventsLost));
        if lost && self.state.borrow().watching {
            self.owe_relist(Instant::now(), 0)?;
        }
        let relisted = self.advance_listing(observer);
        if lost {
            if let Err(e) = relisted {
                log::warn!("listing every SA after lost SA notifications: {e}; trying again later");
            }
            return Err(Error::EventsLost);
        }
        applied?;
        relisted?;
        dispatched
    }

    /// The owed listing, once due: started, then one step a call (see
    /// [`LISTING_STEP`]); at once on a handle that cannot list in steps.
    fn advance_listing(&self, observer: &mut dyn FnMut(&Observed<'_>)) -> Result<()> {
        let start = {
            let state = self.state()?;
            state.listing.is_none() && state.relist.is_some_and(|owed| owed.due <= Instant::now())
        };
        if start {
            if !self.handle.lists_in_steps() {
                return self.relist(observer);
            }
            let local = match self.state()?.wants_direction() {
                true => Some(self.handle.local_addresses()),
                false => None,
            };
            let mut state = self.state()?;
            let failures = state.relist.map_or(0, |owed| owed.failures);
            let begun = match local {
                Some(Err(e)) => Err(e),
                Some(Ok(local)) => {
                    state.local = local;
                    self.handle.start_listing()
                }
                None => self.handle.start_listing(),
            };
            if let Err(e) = begun {
                state.relist = None;
                state.listing_failed(failures);
                return Err(e);
            }
            state.tracked.begin_sweep();
            state.relist = None;
            state.listing = Some(StepListing { sweep: true, failures });
        }
        let (batch, step) = {
            let mut state = self.state()?;
            if state.listing.is_none() {
                return Ok(());
            }
            let mut pending = Vec::new();
            let step = self.handle.listing_step(LISTING_STEP, |info| {
                observe_and_tell(&mut state, SaChange::New, true, info, &mut pending, &mut *observer)
            });
            (Batch::new(pending, &state.rules), step)
        };
        let applied = self.apply(batch);
        let mut state = self.state()?;
        let Some(listing) = state.listing.take() else { return applied };
        match step {
            Ok(ListingStep::More) => state.listing = Some(listing),
            Ok(ListingStep::Done) => {
                if listing.sweep {
                    state.tracked.sweep_unseen();
                }
            }
            Err(e) => {
                // Loss meanwhile may have owed one sooner.
                state.listing_failed(listing.failures);
                return Err(e);
            }
        }
        applied
    }

    fn apply(&self, batch: Batch) -> Result<()> {
        // In slices, so that what a resync of a million SAs keeps in flight
        // stays small.
        for chunk in batch.pending.chunks(APPLY_CHUNK) {
            self.apply_chunk(chunk, &batch.rule_names)?;
        }
        Ok(())
    }

    fn apply_chunk(&self, pending: &[Pending], rule_names: &[String]) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let items: Vec<(SaId, u32, u32)> =
            pending.iter().map(|p| (p.sa, p.thresholds.replay_packets, p.thresholds.timer_ms)).collect();
        let mut results: Vec<Option<Result<()>>> = vec![None; items.len()];
        self.handle.set_thresholds_many(&items, |i, result| results[i] = Some(result))?;
        // Every SA here was just announced or listed by the kernel, yet its
        // lookup can miss it: xfrm_state_lookup walks the SPI hash without
        // the resize seqcount, and a burst of installs resizes the table
        // again and again (seen on 5.10: -ESRCH amid 5,000 new SAs). Those
        // are asked once more, after the resize had time to finish; an SA
        // deleted meanwhile answers -ESRCH again.
        let missed: Vec<usize> = (0..items.len()).filter(|&i| is_esrch(&results[i])).collect();
        if !missed.is_empty() {
            std::thread::sleep(RESIZE_PAUSE);
            let again: Vec<(SaId, u32, u32)> = missed.iter().map(|&i| items[i]).collect();
            self.handle.set_thresholds_many(&again, |n, result| results[missed[n]] = Some(result))?;
        }
        let mut retry = false;
        {
            let mut state = self.state()?;
            for (p, result) in pending.iter().zip(&results) {
                match result {
                    Some(Ok(())) => state.tracked.set_applied(&p.sa, p.thresholds),
                    Some(Err(e)) => retry |= transient(e),
                    None => {}
                }
            }
        }
        if retry {
            self.owe_relist(Instant::now() + relist_wait(1), 1)?;
        }
        self.report(pending, rule_names, results)
    }

    /// Hands each application's result to the `on_applied` callback.
    fn report(&self, applied: &[Pending], rule_names: &[String], results: Vec<Option<Result<()>>>) -> Result<()> {
        let mut callback = self.state()?.on_applied.take();
        for (p, result) in applied.iter().zip(results) {
            let result = result.unwrap_or(Err(Error::Malformed("no answer recorded for a batched request")));
            if let Err(e) = &result {
                log::warn!("thresholds for {}: {e}", p.sa);
            }
            if let Some(cb) = callback.as_mut() {
                let rule = rule_names.get(p.rule as usize).map(String::as_str);
                cb(&self.handle, &Applied { sa: &p.sa, thresholds: p.thresholds, rule, result: &result });
            }
        }
        let mut state = self.state()?;
        if state.on_applied.is_none() {
            state.on_applied = callback;
        }
        Ok(())
    }
}

/// How long a NEWAE that missed a listed SA waits before it is sent again
/// (see `Registry::apply_chunk`): longer than a resize of the kernel's SA
/// hash tables takes under emulation.
const RESIZE_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// A failure that asking again later may not meet: the SA keeps its place
/// in an owed listing, which gives it its thresholds then.
fn transient(e: &Error) -> bool {
    match e {
        Error::TimedOut(_) => true,
        Error::Kernel { errno, .. } | Error::Os { errno, .. } => {
            [libc::ENOMEM, libc::ENOBUFS, libc::EAGAIN, libc::EBUSY, libc::EINTR].contains(errno)
        }
        _ => false,
    }
}

fn is_esrch(result: &Option<Result<()>>) -> bool {
    matches!(result, Some(Err(Error::Kernel { errno, .. })) if *errno == libc::ESRCH)
}

fn direction_of(info: &SaInfo, local: &[IpAddr]) -> Option<Direction> {
    Direction::of_sa(info.direction, info.saddr, info.sa.daddr, local)
}

fn facts_of(info: &SaInfo, local: &[IpAddr]) -> SaFacts {
    SaFacts { sa: info.sa, saddr: info.saddr, reqid: info.reqid, direction: direction_of(info, local) }
}

/// [`observe`], then tells `observer`.
fn observe_and_tell(
    state: &mut State,
    change: SaChange,
    listed: bool,
    info: &SaInfo,
    pending: &mut Vec<Pending>,
    observer: &mut dyn FnMut(&Observed<'_>),
) {
    let (direction, thresholds) = observe(state, change, listed, info, pending);
    observer(&Observed { info, change, listed, direction, thresholds });
}

/// Updates what is known of an SA and queues its thresholds when it lacks
/// them; returns its direction and the thresholds the rules give it. `listed`: seen in a dump rather than announced. An announced
/// install always gets its thresholds again, since the kernel may have
/// re-added the SA under the same identity and install time (charon's
/// MOBIKE does) after a deletion this handle did not see.
fn observe(
    state: &mut State,
    change: SaChange,
    listed: bool,
    info: &SaInfo,
    pending: &mut Vec<Pending>,
) -> (Option<Direction>, Option<Thresholds>) {
    match change {
        SaChange::Deleted | SaChange::Expired { hard: true } => {
            state.tracked.remove(&info.sa);
            return (None, None);
        }
        SaChange::Expired { hard: false } => return (state.tracked.get(&info.sa).and_then(|t| t.direction), None),
        SaChange::New | SaChange::Updated => {}
    }
    // A larval SA (no SPI yet) cannot be addressed by NEWAE.
    if info.sa.spi == 0 {
        return (None, None);
    }
    let facts = facts_of(info, &state.local);
    let add_time = info.lifetime.map_or(0, |l| l.add_time);
    let resolved = state.rules.resolve_at(&facts);
    let tracked = match state.tracked.get(&info.sa) {
        Some(known) if listed && change != SaChange::Updated && state.tracked.same_install(&info.sa, add_time) => {
            state.tracked.seen(&info.sa);
            // An address that came after the SA (a service address moved
            // here after the SA was installed) tells its direction now.
            if known.direction.is_none() && facts.direction.is_some() {
                let learnt = Tracked { direction: facts.direction, ..known };
                state.tracked.set(&info.sa, &learnt);
                learnt
            } else {
                known
            }
        }
        // New, another SA under the same identity, one replaced in place,
        // or an announced install (see above).
        _ => {
            let fresh =
                Tracked { reqid: info.reqid, esn: info.esn(), direction: facts.direction, applied: None, add_time };
            state.tracked.set(&info.sa, &fresh);
            fresh
        }
    };
    if let Some((rule, wanted)) = resolved {
        if tracked.applied != Some(wanted) {
            pending.push(Pending { sa: info.sa, thresholds: wanted, rule: rule.map_or(REGISTERED, |at| at as u32) });
        }
    }
    (tracked.direction, resolved.map(|(_, wanted)| wanted).or(tracked.applied))
}

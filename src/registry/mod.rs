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

use std::cell::RefCell;
use std::net::IpAddr;

use crate::error::{Error, Result};
use crate::handle::{Handle, SaChange, SaNotice};
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
}

/// A handle that gives SAs their thresholds as they appear.
pub struct Registry {
    handle: Handle,
    state: RefCell<State>,
}

impl Registry {
    /// Wraps `handle`. Nothing is watched until the first rule or
    /// registration arrives.
    pub fn new(handle: Handle) -> Registry {
        Registry { handle, state: RefCell::new(State::default()) }
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    fn state(&self) -> Result<std::cell::RefMut<'_, State>> {
        self.state.try_borrow_mut().map_err(|_| Error::Busy("the registry is in use (called from its own callback?)"))
    }

    /// Adds a rule, or replaces the one of the same name, then applies the
    /// rules to every SA there is.
    pub fn add_rule(&self, rule: Rule) -> Result<()> {
        self.state()?.rules.add(rule);
        self.rules_changed()
    }

    /// Removes the rule named `name` (whether there was one), then applies
    /// the rules again.
    pub fn remove_rule(&self, name: &str) -> Result<bool> {
        let removed = self.state()?.rules.remove(name);
        self.rules_changed()?;
        Ok(removed)
    }

    /// Replaces every rule at once (a reloaded rules file).
    pub fn set_rules(&self, rules: Vec<Rule>) -> Result<()> {
        self.state()?.rules.replace_rules(rules);
        self.rules_changed()
    }

    /// Gives exactly this SA these thresholds, before all rules; `None`
    /// removes the registration.
    ///
    /// Only this SA is touched (no listing, unless this is the first rule or
    /// registration): a daemon registers each SA it installs. An SA that is
    /// not installed yet, or is still a placeholder from SPI allocation
    /// (the kernel answers `ESRCH` or `EINVAL`), gets its thresholds when
    /// the kernel announces it.
    pub fn register_sa(&self, sa: SaId, thresholds: Option<Thresholds>) -> Result<()> {
        let first = {
            let mut state = self.state()?;
            state.rules.register_sa(sa, thresholds);
            !state.watching
        };
        match thresholds {
            _ if first => self.rules_changed(),
            None => Ok(()),
            Some(t) => {
                let mut result = Ok(());
                self.handle.set_thresholds_many(&[(sa, t.replay_packets, t.timer_ms)], |_, r| result = r)?;
                match result {
                    Err(Error::Kernel { errno, .. }) if errno == libc::ESRCH || errno == libc::EINVAL => Ok(()),
                    other => {
                        if other.is_ok() {
                            self.state()?.tracked.set_applied(&sa, t);
                        }
                        self.report(&[Pending { sa, thresholds: t, rule: REGISTERED }], &[], vec![Some(other)])
                    }
                }
            }
        }
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
        if state.rules.needs_direction() && info.direction.is_none() && state.local.is_empty() {
            state.local = self.handle.local_addresses()?;
        }
        Ok(facts_of(info, &state.local))
    }

    fn rules_changed(&self) -> Result<()> {
        let start = {
            let mut state = self.state()?;
            let start = !state.watching && !state.rules.is_empty();
            state.watching |= start;
            start
        };
        if start {
            self.handle.watch_sas(true)?;
        }
        if self.state.borrow().watching {
            self.resync()?;
        }
        Ok(())
    }

    /// Lists every SA and applies the rules where an SA lacks its
    /// thresholds; forgets SAs that are gone.
    pub fn resync(&self) -> Result<()> {
        let batch = {
            let mut state = self.state()?;
            let mut pending = Vec::new();
            if state.rules.needs_direction() {
                state.local = self.handle.local_addresses()?;
            }
            // Mark and sweep: what the dump lists is marked seen, the rest
            // forgotten, only once the whole dump arrived.
            state.tracked.begin_sweep();
            self.handle.dump_sas(|info| observe(&mut state, SaChange::New, true, info, &mut pending))?;
            state.tracked.sweep_unseen();
            Batch::new(pending, &state.rules)
        };
        self.apply(batch)
    }

    /// Dispatches the handle's events (see [`Handle::dispatch`]) and gives
    /// SAs that appeared their thresholds. After lost notifications it lists
    /// every SA again before it returns [`Error::EventsLost`], which still
    /// tells the caller that aevents were lost too.
    pub fn dispatch(&self) -> Result<usize> {
        let (batch, dispatched) = {
            let mut state = self.state()?;
            let mut pending = Vec::new();
            let mut refreshed = false;
            let dispatched = self.handle.dispatch_with(&mut |handle: &Handle, notice: &SaNotice| {
                let info = &notice.info;
                let unknown_direction = state.rules.needs_direction()
                    && info.direction.is_none()
                    && direction_of(info, &state.local).is_none();
                if unknown_direction && !refreshed {
                    // A new address (MOBIKE, a new link): learn it once per call.
                    refreshed = true;
                    match handle.local_addresses() {
                        Ok(local) => state.local = local,
                        Err(e) => log::warn!("listing local addresses: {e}"),
                    }
                }
                observe(&mut state, notice.change, false, info, &mut pending);
            });
            (Batch::new(pending, &state.rules), dispatched)
        };
        self.apply(batch)?;
        match dispatched {
            Err(Error::EventsLost) if self.state.borrow().watching => {
                self.resync()?;
                Err(Error::EventsLost)
            }
            other => other,
        }
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
        {
            let mut state = self.state()?;
            for (p, result) in pending.iter().zip(&results) {
                if let Some(Ok(())) = result {
                    state.tracked.set_applied(&p.sa, p.thresholds);
                }
            }
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

fn is_esrch(result: &Option<Result<()>>) -> bool {
    matches!(result, Some(Err(Error::Kernel { errno, .. })) if *errno == libc::ESRCH)
}

fn direction_of(info: &SaInfo, local: &[IpAddr]) -> Option<Direction> {
    Direction::of_sa(info.direction, info.saddr, info.sa.daddr, local)
}

fn facts_of(info: &SaInfo, local: &[IpAddr]) -> SaFacts {
    SaFacts { sa: info.sa, saddr: info.saddr, reqid: info.reqid, direction: direction_of(info, local) }
}

/// Updates what is known of an SA and queues its thresholds when it lacks
/// them. `listed`: seen in a dump rather than announced. An announced
/// install always gets its thresholds again, since the kernel may have
/// re-added the SA under the same identity and install time (charon's
/// MOBIKE does) after a deletion this handle did not see.
fn observe(state: &mut State, change: SaChange, listed: bool, info: &SaInfo, pending: &mut Vec<Pending>) {
    match change {
        SaChange::Deleted | SaChange::Expired { hard: true } => {
            state.tracked.remove(&info.sa);
            return;
        }
        SaChange::Expired { hard: false } => return,
        SaChange::New | SaChange::Updated => {}
    }
    // A larval SA (no SPI yet) cannot be addressed by NEWAE.
    if info.sa.spi == 0 {
        return;
    }
    let facts = facts_of(info, &state.local);
    let add_time = info.lifetime.map_or(0, |l| l.add_time);
    let resolved = state.rules.resolve_at(&facts);
    let tracked = match state.tracked.get(&info.sa) {
        Some(known) if listed && change != SaChange::Updated && state.tracked.same_install(&info.sa, add_time) => {
            state.tracked.seen(&info.sa);
            known
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
}

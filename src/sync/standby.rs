//! The standby node's side of HA sync: the latest record of every SA, held
//! in memory and never written to the kernel before a takeover; then the
//! takeover itself, [`Standby::commit`].
//!
//! A record older than the one held for its SA (by epoch, then counter), or
//! from an epoch below the highest this node knows, is ignored: it comes
//! from a node that has since been replaced, or is a retransmission that
//! arrived late.
//!
//! The commit lists the local SAs once, plans each one that has a record
//! ([`crate::sync::plan`]: margins, inbound policy, lifetimes, the SAs that
//! need a rekey), and writes the plans with batched `NEWAE`s, each
//! acknowledgement checked. An SA is never deleted and added again: its
//! keys, and any traffic selector state, stay as the HA product installed
//! them. One SA that fails is reported; every other one still commits.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::aevent::{AeUpdate, Aevent};
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::registry::Direction;
use crate::sa::SaId;
use crate::sync::commit::{margin, moving_number, plan, CommitPlan, InboundPolicy, MarginPolicy, Mismatch};
use crate::sync::SyncRecord;
use crate::wire::SaInfo;

/// What became of a received record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Held: the SA's latest.
    Held,
    /// The held record is as new or newer.
    Older,
    /// From an epoch below the highest known: its sender was replaced.
    LowerEpoch,
}

/// Counts of what a standby received, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandbyStats {
    pub held: u64,
    pub older: u64,
    pub lower_epoch: u64,
    pub forgotten: u64,
}

/// How far the record a standby holds of an SA is behind the active
/// node's kernel, by a sample of it ([`crate::sync::Active::sample`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    /// The held record's moving number is `packets` below the sample's;
    /// a commit at the sample's time would have added `margin`. A lag
    /// above the margin means a takeover then would have reused sequence
    /// numbers.
    Behind { packets: u64, margin: u64 },
    /// No record of the SA is held.
    NotHeld,
    /// The sample is of an epoch below the highest known: its sender was
    /// replaced, and it measures nothing this node would commit.
    LowerEpoch,
}

/// How a commit writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitOptions {
    pub margin: MarginPolicy,
    pub inbound: InboundPolicy,
    /// The commit's time, ms since the Unix epoch; `None`: now. Records'
    /// ages, and so margins, count to it.
    pub now_ms: Option<u64>,
}

/// One SA's commit.
#[derive(Debug)]
pub struct SaCommit {
    pub sa: SaId,
    pub direction: Option<Direction>,
    /// The record's age at commit, ms.
    pub record_age_ms: u64,
    /// The record's estimate of the SA's rate, packets per 1,000 s.
    pub rate_per_ks: u64,
    pub outcome: Outcome,
}

/// What a commit did to one SA.
#[derive(Debug)]
pub enum Outcome {
    /// Written: the moving number went from `local` to `written`; the
    /// record held `synced`, and `margin` was added (outbound, or inbound
    /// under `strict`).
    Written { synced: u64, local: u64, written: u64, margin: u64 },
    /// Not written: its number plus the margin would pass 2^32 - 1 and the
    /// SA has no ESN. It must be rekeyed, and is left so it is retired
    /// first.
    NeedsRekey { synced: u64, next: u64, margin: u64 },
    /// The record does not fit the local SA (see [`Mismatch`]).
    Mismatch(Mismatch),
    /// The kernel refused the write.
    Failed(Error),
}

impl Outcome {
    pub fn is_written(&self) -> bool {
        matches!(self, Outcome::Written { .. })
    }
}

/// A whole commit.
#[derive(Debug)]
pub struct Commit {
    /// The epoch the node holds from now on: above every one it knew.
    pub epoch: u64,
    /// Every local SA with a record, in listing order.
    pub sas: Vec<SaCommit>,
    /// Records held for SAs that are not installed here.
    pub missing_locally: Vec<SaId>,
}

impl Commit {
    pub fn written(&self) -> usize {
        self.sas.iter().filter(|s| s.outcome.is_written()).count()
    }
}

/// A record as the standby keeps it: encoded, as it came off the link,
/// which for most SAs is a fifth of the decoded form (whose ESN bitmap has
/// room for 128 words); its order kept beside it for the comparisons.
#[derive(Debug)]
struct Held {
    epoch: u64,
    counter: u64,
    bytes: Box<[u8]>,
}

impl Held {
    fn new(record: &SyncRecord) -> Result<Held> {
        let mut bytes = Vec::with_capacity(record.encoded_len());
        record.encode(&mut bytes)?;
        Ok(Held { epoch: record.epoch, counter: record.counter, bytes: bytes.into_boxed_slice() })
    }

    fn record(&self) -> SyncRecord {
        SyncRecord::decode(&self.bytes).expect("a record the standby encoded decodes")
    }
}

/// The latest record of each SA, and the highest epoch known.
#[derive(Debug, Default)]
pub struct Standby {
    records: HashMap<SaId, Held>,
    epoch: u64,
    stats: StandbyStats,
}

impl Standby {
    /// A standby whose own epoch is `epoch` (kept across restarts by its
    /// caller: it must never go back).
    pub fn new(epoch: u64) -> Standby {
        Standby { epoch, ..Standby::default() }
    }

    /// The highest epoch known: this node's own, or one a record carried.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn stats(&self) -> StandbyStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, sa: &SaId) -> Option<SyncRecord> {
        self.records.get(sa).map(Held::record)
    }

    pub fn records(&self) -> impl Iterator<Item = SyncRecord> + '_ {
        self.records.values().map(Held::record)
    }

    /// Takes `record` if it is the newest of its SA. A record whose
    /// addresses are of two families is no SA's, and is refused.
    pub fn receive(&mut self, record: SyncRecord) -> Result<Received> {
        if record.epoch < self.epoch {
            self.stats.lower_epoch += 1;
            return Ok(Received::LowerEpoch);
        }
        let held = Held::new(&record)?;
        self.epoch = record.epoch;
        match self.records.get_mut(&record.sa) {
            Some(old) if record.order() <= (old.epoch, old.counter) => {
                self.stats.older += 1;
                Ok(Received::Older)
            }
            Some(old) => {
                *old = held;
                self.stats.held += 1;
                Ok(Received::Held)
            }
            None => {
                self.records.insert(record.sa, held);
                self.stats.held += 1;
                Ok(Received::Held)
            }
        }
    }

    /// How far the record held for `sample`'s SA is behind it, with the
    /// margin a commit at the sample's time would add under `policy`. The
    /// sample is not held. A held record newer than the sample is 0 behind.
    pub fn lag(&self, sample: &SyncRecord, policy: &MarginPolicy) -> Lag {
        if sample.epoch < self.epoch {
            return Lag::LowerEpoch;
        }
        let Some(held) = self.get(&sample.sa) else { return Lag::NotHeld };
        let direction = sample.direction.or(held.direction);
        let packets = moving_number(&sample.replay, direction).saturating_sub(moving_number(&held.replay, direction));
        Lag::Behind { packets, margin: margin(&held, sample.sent_at_ms, policy) }
    }

    /// Learns that some node holds `epoch` (its heartbeat said so): records
    /// below it are ignored from now on.
    pub fn learn_epoch(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
    }

    /// Takes a departure: forgets its SA, unless it comes from an epoch
    /// below the highest known.
    pub fn depart(&mut self, departure: &crate::sync::Departure) -> Received {
        if departure.epoch < self.epoch {
            self.stats.lower_epoch += 1;
            return Received::LowerEpoch;
        }
        self.forget(&departure.sa);
        Received::Held
    }

    /// Forgets `sa`: the active node says it is gone.
    pub fn forget(&mut self, sa: &SaId) -> bool {
        let forgot = self.records.remove(sa).is_some();
        self.stats.forgotten += u64::from(forgot);
        forgot
    }

    /// The takeover: writes every held record into the local SA it belongs
    /// to (see the module's text) and starts a higher epoch, which the
    /// caller keeps (before it sends anything) and hands to the node's
    /// active side. The error is for a kernel that cannot be listed or
    /// asked at all; an SA that fails is in [`Commit::sas`].
    pub fn commit(&mut self, handle: &Handle, options: &CommitOptions) -> Result<Commit> {
        let now = options.now_ms.unwrap_or_else(crate::sync::now_ms);
        let local_addresses = handle.local_addresses()?;
        let mut local: Vec<SaInfo> = Vec::new();
        handle.dump_sas(|info| {
            if self.records.contains_key(&info.sa) {
                local.push(*info);
            }
        })?;
        let mut sas = Vec::with_capacity(local.len());
        let mut writes: Vec<(SaId, AeUpdate)> = Vec::new();
        let mut written_at = Vec::new();
        for info in &local {
            let record = &self.records[&info.sa].record();
            let direction =
                Direction::of_sa(info.direction, info.saddr, info.sa.daddr, &local_addresses).or(record.direction);
            let record_age_ms = now.saturating_sub(record.sent_at_ms);
            let outcome = match local_state(info) {
                None => Outcome::Failed(Error::Malformed("the SA's listing has no replay state or lifetime")),
                Some(state) => {
                    match plan(record, &state, info.esn(), direction, now, &options.margin, options.inbound) {
                        Err(mismatch) => Outcome::Mismatch(mismatch),
                        Ok(CommitPlan::NeedsRekey { next, margin }) => {
                            Outcome::NeedsRekey { synced: moving_number(&record.replay, direction), next, margin }
                        }
                        Ok(CommitPlan::Write { update, margin }) => {
                            let written = update.replay.as_ref().map_or(0, |r| moving_number(r, direction));
                            written_at.push(sas.len());
                            writes.push((info.sa, update));
                            Outcome::Written {
                                synced: moving_number(&record.replay, direction),
                                local: moving_number(&state.replay, direction),
                                written,
                                margin,
                            }
                        }
                    }
                }
            };
            sas.push(SaCommit { sa: info.sa, direction, record_age_ms, rate_per_ks: record.rate_per_ks, outcome });
        }
        let mut answered = vec![false; writes.len()];
        let sent = handle.update_many(&writes, |i, result| {
            answered[i] = true;
            if let Err(e) = result {
                sas[written_at[i]].outcome = Outcome::Failed(e);
            }
        });
        // Some SAs may be written already: the commit goes on to its new
        // epoch, and those never sent say why.
        if let Err(e) = sent {
            for (i, _) in answered.iter().enumerate().filter(|(_, answered)| !**answered) {
                sas[written_at[i]].outcome = Outcome::Failed(e.clone());
            }
        }
        let listed: std::collections::HashSet<SaId> = local.iter().map(|i| i.sa).collect();
        let missing_locally = self.records.keys().filter(|sa| !listed.contains(sa)).copied().collect();
        self.epoch += 1;
        Ok(Commit { epoch: self.epoch, sas, missing_locally })
    }
}

/// A listed SA's state in the shape the planner takes.
fn local_state(info: &SaInfo) -> Option<Aevent> {
    let (replay, lifetime) = (info.replay?, info.lifetime?);
    Some(Aevent {
        sa: info.sa,
        saddr: info.saddr.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        reqid: info.reqid,
        flags: 0,
        replay,
        lifetime,
        replay_threshold: None,
        timer_threshold_ms: None,
        nlmsg_seq: 0,
        nlmsg_pid: 0,
    })
}

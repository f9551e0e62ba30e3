//! What a standby's commit writes into one of its SAs, from the record it
//! holds and the SA's local state: the arithmetic of a takeover, apart from
//! the kernel.
//!
//! - **Outbound:** the synced number plus a margin, never below the local
//!   value. The margin covers what the active node may have sent since the
//!   record: its rate times the record's age at commit plus the detection
//!   time, plus the replay threshold (the most it sends between two
//!   events), times a safety factor; then held between a floor and a
//!   ceiling.
//! - **Inbound:** `accept` continues from the synced state; `strict`
//!   advances by the margin as well, every number below the new one taken
//!   as seen.
//! - **Lifetimes:** max(local, synced + margin): the packets the margin
//!   covers, and bytes for them at the SA's average packet size, are
//!   counted as if sent, so a hard limit expires no later than on the
//!   active node, only earlier by at most the margin.
//! - **Wrap:** an SA with the ESN flag counts in 64 bits; one without it (a
//!   wide window included) whose number plus margin would pass 2^32 - 1 is
//!   not written: it needs a rekey, and is left so that it is retired
//!   first.

use crate::aevent::{AeUpdate, Aevent, EsnReplay, LegacyReplay, Lifetime, Replay};
use crate::registry::Direction;
use crate::sync::record::SyncRecord;

/// How the margin is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarginPolicy {
    /// How long the failure took to notice and act on, ms.
    pub detection_ms: u64,
    /// Multiplies the estimate (at least 1).
    pub safety_factor: f64,
    pub floor: u64,
    pub ceiling: u64,
}

impl Default for MarginPolicy {
    /// 3 s to notice, twice the estimate, at least 1,024 and at most 2^30
    /// packets.
    fn default() -> MarginPolicy {
        MarginPolicy { detection_ms: 3000, safety_factor: 2.0, floor: 1024, ceiling: 1 << 30 }
    }
}

/// What a standby does with the inbound SAs it takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboundPolicy {
    /// Continue from the synced state: packets the active node had not seen
    /// yet are accepted (the default).
    #[default]
    Accept,
    /// Advance by the margin too: anything the peer sent before the
    /// takeover may have reached the old node, so it is refused.
    Strict,
}

/// The margin for `record` at `now_ms` (ms since the Unix epoch).
pub fn margin(record: &SyncRecord, now_ms: u64, policy: &MarginPolicy) -> u64 {
    let age_ms = now_ms.saturating_sub(record.sent_at_ms);
    // packets per 1,000 s times ms is packets times 10^6
    let sent =
        (u128::from(record.rate_per_ks) * u128::from(age_ms.saturating_add(policy.detection_ms))).div_ceil(1_000_000);
    let threshold = record.thresholds.map_or(0, |t| u128::from(t.replay_packets));
    let estimate = ((sent + threshold) as f64 * policy.safety_factor.max(1.0)).ceil();
    let estimate = if estimate >= u64::MAX as f64 { u64::MAX } else { estimate as u64 };
    estimate.clamp(policy.floor, policy.ceiling.max(policy.floor))
}

/// The number that moves with an SA's traffic in `direction`: the
/// outbound one, or the inbound one; the larger where the direction is not
/// known (the other stays 0).
pub fn moving_number(replay: &Replay, direction: Option<Direction>) -> u64 {
    match direction {
        Some(Direction::Out) => replay.oseq64(),
        Some(Direction::In) => replay.seq64(),
        None => replay.oseq64().max(replay.seq64()),
    }
}

/// What a commit does to one SA.
// Like `Replay`, large on purpose: the ESN bitmap is a fixed array.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CommitPlan {
    /// Send this `NEWAE` (replay state and lifetime); `margin` is what was
    /// added to the synced number.
    Write { update: AeUpdate, margin: u64 },
    /// The SA has no ESN flag and its number plus the margin passes
    /// 2^32 - 1: nothing is written; it must be rekeyed.
    NeedsRekey { next: u64, margin: u64 },
}

/// Why a record cannot be committed to a local SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The record is for another SA.
    OtherSa,
    /// The record's ESN flag or replay format differs from the local SA's:
    /// they were not installed alike.
    ReplayForm,
    /// The SA's direction is known neither from the record nor locally.
    NoDirection,
}

/// Plans the commit of `record` to the local SA whose state is `local`
/// (its `GETAE` answer). `direction` is the local knowledge of which way
/// the SA carries traffic; the record's is used when it is `None`.
pub fn plan(
    record: &SyncRecord,
    local: &Aevent,
    local_esn: bool,
    direction: Option<Direction>,
    now_ms: u64,
    policy: &MarginPolicy,
    inbound: InboundPolicy,
) -> Result<CommitPlan, Mismatch> {
    if record.sa != local.sa {
        return Err(Mismatch::OtherSa);
    }
    if record.esn != local_esn || record.replay.is_esn() != local.replay.is_esn() {
        return Err(Mismatch::ReplayForm);
    }
    let direction = direction.or(record.direction).ok_or(Mismatch::NoDirection)?;
    let margin = margin(record, now_ms, policy);
    // Only an SA with the ESN flag (and so its ESN-format state) counts
    // past 2^32.
    let limit = if record.esn && record.replay.is_esn() { u64::MAX } else { u64::from(u32::MAX) };
    let average_size = record.lifetime_bytes.checked_div(record.lifetime_packets).unwrap_or(0);
    let lifetime = Lifetime {
        bytes: record.lifetime_bytes.saturating_add(margin.saturating_mul(average_size)).max(local.lifetime.bytes),
        packets: record.lifetime_packets.saturating_add(margin).max(local.lifetime.packets),
        ..local.lifetime
    };
    let replay = match direction {
        Direction::Out => {
            let next = record.replay.oseq64().saturating_add(margin).max(local.replay.oseq64());
            if next > limit || (next == u64::MAX && record.replay.oseq64().checked_add(margin).is_none()) {
                return Ok(CommitPlan::NeedsRekey { next, margin });
            }
            with_oseq(&local.replay, next)
        }
        Direction::In => {
            let (seq, synced_newer) = match inbound {
                InboundPolicy::Accept => {
                    (record.replay.seq64().max(local.replay.seq64()), record.replay.seq64() > local.replay.seq64())
                }
                InboundPolicy::Strict => {
                    let next = record.replay.seq64().saturating_add(margin);
                    if next > limit {
                        return Ok(CommitPlan::NeedsRekey { next, margin });
                    }
                    (next.max(local.replay.seq64()), true)
                }
            };
            with_seq(&local.replay, &record.replay, seq, synced_newer, inbound)
        }
    };
    let update = AeUpdate { replay: Some(replay), lifetime: Some(lifetime), ..AeUpdate::default() };
    Ok(CommitPlan::Write { update, margin })
}

/// The local state with the outbound number `next`; the inbound half and
/// the bitmap stay the local SA's.
fn with_oseq(local: &Replay, next: u64) -> Replay {
    match *local {
        Replay::Legacy(r) => Replay::Legacy(LegacyReplay { oseq: next as u32, ..r }),
        Replay::Esn(r) => Replay::Esn(EsnReplay { oseq: next as u32, oseq_hi: (next >> 32) as u32, ..r }),
    }
}

/// The local state with the inbound number `seq`. When the synced state is
/// the newer, its window comes too (`accept`), or every number up to `seq`
/// is taken as seen (`strict`); the local bitmap's length is kept, as the
/// kernel requires.
fn with_seq(local: &Replay, synced: &Replay, seq: u64, synced_newer: bool, inbound: InboundPolicy) -> Replay {
    match (*local, synced) {
        (Replay::Legacy(l), Replay::Legacy(s)) => {
            let bitmap = match (synced_newer, inbound) {
                (false, _) => l.bitmap,
                (true, InboundPolicy::Accept) => s.bitmap,
                (true, InboundPolicy::Strict) => u32::MAX,
            };
            Replay::Legacy(LegacyReplay { seq: seq as u32, bitmap, ..l })
        }
        (Replay::Esn(l), Replay::Esn(s)) => {
            let mut next = EsnReplay { seq: seq as u32, seq_hi: (seq >> 32) as u32, ..l };
            match (synced_newer, inbound) {
                (false, _) => {}
                (true, InboundPolicy::Accept) => {
                    let words = next.bmp_len as usize;
                    next.bmp = [0; crate::aevent::MAX_BITMAP_WORDS];
                    let from = s.bitmap();
                    next.bmp[..words.min(from.len())].copy_from_slice(&from[..words.min(from.len())]);
                }
                (true, InboundPolicy::Strict) => {
                    let words = next.bmp_len as usize;
                    next.bmp[..words].fill(u32::MAX);
                }
            }
            Replay::Esn(next)
        }
        // `plan` checked that both have one form.
        (other, _) => other,
    }
}

//! HA sync (issue 13): an active node tells a standby the state of every
//! SA, and the standby takes the SAs over without reusing a sequence
//! number.
//!
//! - [`record`]: the sync record, one SA's state on the wire;
//! - [`active`]: the active node's side, records from aevents, listings and
//!   notifications;
//! - [`standby`]: the standby's side, the latest record per SA, how far
//!   behind the active node's kernel it is by a sample ([`Standby::lag`]),
//!   and the commit that writes the records into its kernel at takeover;
//! - [`commit`]: the commit's arithmetic (margins, inbound policies,
//!   lifetimes, SAs that need a rekey), apart from the kernel.
//!
//! **Epochs.** Each commit starts an epoch above every one its node knew,
//! carried in every record it sends from then on. A node still active that
//! learns of a higher epoch was replaced ([`Active::learn_epoch`]): it stops
//! sending, so that two nodes never send on one SA.
//!
//! The transport between the nodes is the caller's (`xfrmsync sync` has its
//! own); the engine only makes and takes records.

pub mod active;
pub mod commit;
pub mod record;
pub mod standby;

pub use active::{Active, ActiveConfig, ActiveStats, Outgoing};
pub use commit::{margin, moving_number, plan, CommitPlan, InboundPolicy, MarginPolicy, Mismatch};
pub use record::{Departure, SyncRecord, DEPARTURE_LEN, MAX_RECORD_LEN, RECORD_VERSION};
pub use standby::{Commit, CommitOptions, Lag, Outcome, Received, SaCommit, Standby, StandbyStats};

/// The wall clock, ms since the Unix epoch: records carry it, so that a
/// standby can tell their age. The two nodes' clocks must agree (NTP).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

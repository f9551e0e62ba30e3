//! HA sync, the engine's first parts (issue 13): the sync record an active
//! node sends a standby for each SA ([`record`]), and the arithmetic of a
//! standby's commit ([`commit`]): margins, inbound policies, lifetimes, and
//! the SAs that must be rekeyed instead of wrapped. The active and standby
//! sides, epochs and the transport build on these.

pub mod commit;
pub mod record;

pub use commit::{margin, plan, CommitPlan, InboundPolicy, MarginPolicy, Mismatch};
pub use record::{SyncRecord, MAX_RECORD_LEN, RECORD_VERSION};

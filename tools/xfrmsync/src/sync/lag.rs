//! The replication lag a standby measures: the active node samples its
//! kernel's state of a few SAs at a time (`[active] lag_sample_ms`,
//! `lag_sample_sas`), and each standby compares every sample with the
//! record it holds of that SA ([`Standby::lag`]) and with the margin a
//! takeover at that moment would have added. A lag above that margin is
//! what an operator must hear of: a takeover then would have sent sequence
//! numbers the old active node had used.
//!
//! Between two records an SA moves by up to its replay threshold, or a
//! timer period of traffic, plus what is in flight on the link: only a
//! fresh read of the active node's kernel shows how much, which is why the
//! samples exist. They are never held: a record is what a commit writes.

use std::collections::HashMap;
use std::time::Instant;

use xfrmsync::sync::{Lag, MarginPolicy, Standby, SyncRecord};
use xfrmsync::SaId;

/// The histogram's upper bounds, in packets; `+Inf` follows. Powers of 4
/// from 1, so that both a threshold of 16 and a margin of 65,536 fall on
/// a bound's scale.
pub const BUCKETS: [u64; 10] = [0, 1, 4, 16, 64, 256, 1024, 4096, 16384, 65536];

/// The last sample of one SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaLag {
    pub packets: u64,
    pub margin: u64,
    pub at: Instant,
}

/// What the last message of samples showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastBatch {
    pub at: Instant,
    /// SAs of the message compared with a record held.
    pub compared: u64,
    pub max_packets: u64,
    /// The greatest lag over its SA's margin.
    pub max_margin_ratio: f64,
}

/// Every sample a standby compared, and the last of each SA.
#[derive(Debug, Default)]
pub struct LagTracker {
    /// Samples compared with a record held.
    pub compared: u64,
    /// Samples of SAs no record was held of.
    pub not_held: u64,
    /// Samples from an epoch below the highest known.
    pub lower_epoch: u64,
    /// Samples whose lag was above the margin.
    pub over_margin: u64,
    /// Compared samples per bucket of [`BUCKETS`] (each in the first
    /// whose bound it does not pass), then those above every bound.
    pub buckets: [u64; BUCKETS.len() + 1],
    /// Of every compared sample's lag.
    pub sum: u64,
    pub last: Option<LastBatch>,
    per_sa: HashMap<SaId, SaLag>,
}

impl LagTracker {
    /// Compares each of `samples`, one message's, with what `standby` holds.
    pub fn take(&mut self, standby: &Standby, samples: &[SyncRecord], policy: &MarginPolicy, now: Instant) {
        let mut batch = LastBatch { at: now, compared: 0, max_packets: 0, max_margin_ratio: 0.0 };
        for sample in samples {
            match standby.lag(sample, policy) {
                Lag::NotHeld => self.not_held += 1,
                Lag::LowerEpoch => self.lower_epoch += 1,
                Lag::Behind { packets, margin } => {
                    self.compared += 1;
                    self.sum = self.sum.saturating_add(packets);
                    let bucket = BUCKETS.iter().position(|bound| packets <= *bound).unwrap_or(BUCKETS.len());
                    self.buckets[bucket] += 1;
                    if packets > margin {
                        self.over_margin += 1;
                        log::warn!(
                            "{}: the record held is {packets} packets behind the active node's kernel, more than the \
                             margin of {margin} a takeover now would add",
                            sample.sa
                        );
                    }
                    batch.compared += 1;
                    batch.max_packets = batch.max_packets.max(packets);
                    // A margin is at least 1 packet (the config refuses a ceiling of 0).
                    batch.max_margin_ratio = batch.max_margin_ratio.max(packets as f64 / margin.max(1) as f64);
                    self.per_sa.insert(sample.sa, SaLag { packets, margin, at: now });
                }
            }
        }
        self.last = Some(batch);
    }

    /// The last sample of `sa`.
    pub fn of(&self, sa: &SaId) -> Option<SaLag> {
        self.per_sa.get(sa).copied()
    }

    /// `sa` is gone: its last sample goes with it.
    pub fn forget(&mut self, sa: &SaId) {
        self.per_sa.remove(sa);
    }

    /// The node is no longer a standby: the per-SA samples describe SAs it
    /// now sends on itself. The counts stay, like every other counter.
    pub fn forget_every_sa(&mut self) {
        self.per_sa = HashMap::new();
        self.last = None;
    }

    /// The histogram's cumulative counts, one per bound of [`BUCKETS`]
    /// then `+Inf`, as Prometheus wants them.
    pub fn cumulative(&self) -> [u64; BUCKETS.len() + 1] {
        let mut running = 0;
        self.buckets.map(|n| {
            running += n;
            running
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use xfrmsync::aevent::LegacyReplay;
    use xfrmsync::{Replay, Thresholds};

    fn record(spi: u32, oseq: u32, sent_at_ms: u64) -> SyncRecord {
        SyncRecord {
            sa: SaId::esp("10.9.0.2".parse().unwrap(), spi),
            saddr: "10.9.0.1".parse::<IpAddr>().unwrap(),
            reqid: 1,
            direction: None,
            esn: false,
            replay: Replay::Legacy(LegacyReplay { oseq, seq: 0, bitmap: 0 }),
            lifetime_bytes: 0,
            lifetime_packets: 0,
            thresholds: Some(Thresholds { replay_packets: 16, timer_ms: 1000 }),
            epoch: 1,
            counter: 1,
            sent_at_ms,
            rate_per_ks: 0,
        }
    }

    #[test]
    fn samples_fill_the_histogram_the_counts_and_the_last_batch() {
        let mut standby = Standby::new(1);
        for spi in 1..=3 {
            standby.receive(record(spi, 100, 1_000)).unwrap();
        }
        // No rate: every margin is the floor, 10, or the threshold times 2.
        let policy = MarginPolicy { detection_ms: 0, safety_factor: 2.0, floor: 10, ceiling: 1 << 30 };
        let mut lag = LagTracker::default();
        let now = Instant::now();
        let samples = [record(1, 100, 1_500), record(2, 104, 1_500), record(3, 140, 1_500), record(4, 9, 1_500)];
        lag.take(&standby, &samples, &policy, now);
        assert_eq!((lag.compared, lag.not_held, lag.over_margin, lag.sum), (3, 1, 1, 44));
        assert_eq!(lag.cumulative(), [1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3]);
        let last = lag.last.unwrap();
        assert_eq!((last.compared, last.max_packets), (3, 40));
        assert!((last.max_margin_ratio - 40.0 / 32.0).abs() < 1e-9, "{last:?}");
        assert_eq!(lag.of(&samples[2].sa), Some(SaLag { packets: 40, margin: 32, at: now }));
        assert_eq!(lag.of(&samples[3].sa), None, "not held, so no lag");

        // A lag beyond every bound lands in +Inf only.
        lag.take(&standby, &[record(1, 100_000, 2_000)], &policy, now);
        assert_eq!(lag.cumulative()[BUCKETS.len() - 1], 3);
        assert_eq!(lag.cumulative()[BUCKETS.len()], 4);

        standby.learn_epoch(2);
        lag.take(&standby, &[record(1, 100, 2_000)], &policy, now);
        assert_eq!((lag.lower_epoch, lag.compared), (1, 4));
        lag.forget(&samples[0].sa);
        assert_eq!(lag.of(&samples[0].sa), None);
        lag.forget_every_sa();
        assert_eq!((lag.of(&samples[1].sa), lag.last, lag.compared), (None, None, 4));
    }
}

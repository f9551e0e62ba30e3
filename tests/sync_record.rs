//! Sync records (issue 13): the byte layout the module documents, checked
//! against bytes built here by hand; round trips; every kind of bad record
//! refused; which record replaces which; and the arithmetic of a standby's
//! commit (margins, wrap, inbound policies, lifetimes).

use std::net::IpAddr;

use xfrmsync::registry::Direction;
use xfrmsync::sync::{margin, plan, CommitPlan, InboundPolicy, MarginPolicy, Mismatch, SyncRecord, MAX_RECORD_LEN};
use xfrmsync::{Aevent, Error, EsnReplay, LegacyReplay, Lifetime, Replay, SaId, Thresholds};

fn legacy_v4() -> SyncRecord {
    SyncRecord {
        sa: SaId::esp("10.9.0.2".parse().unwrap(), 0xc0ffee01).with_mark(7, 0xff),
        saddr: "10.9.0.1".parse().unwrap(),
        reqid: 11,
        direction: Some(Direction::Out),
        esn: false,
        replay: Replay::Legacy(LegacyReplay { oseq: 0x1234, seq: 0x55, bitmap: 0xffff_0001 }),
        lifetime_bytes: 1_000_000,
        lifetime_packets: 8_000,
        thresholds: Some(Thresholds { replay_packets: 32, timer_ms: 2000 }),
        epoch: 3,
        counter: 77,
        sent_at_ms: 1_796_000_000_000,
        rate_per_ks: 2_000_000,
    }
}

fn esn_v6(words: usize) -> SyncRecord {
    let bitmap: Vec<u32> = (0..words as u32).map(|i| 0x0101_0101 * (i + 1)).collect();
    SyncRecord {
        sa: SaId::esp("2001:db8::2".parse().unwrap(), 0x42),
        saddr: "2001:db8::1".parse().unwrap(),
        reqid: 12,
        direction: Some(Direction::In),
        esn: true,
        replay: Replay::Esn(EsnReplay::new(5, 0xffff_fff0, 1, 2, 32 * words as u32, &bitmap).unwrap()),
        lifetime_bytes: 5,
        lifetime_packets: 6,
        thresholds: None,
        epoch: 1,
        counter: 1,
        sent_at_ms: 9,
        rate_per_ks: 0,
    }
}

fn encoded(record: &SyncRecord) -> Vec<u8> {
    let mut out = Vec::new();
    record.encode(&mut out).unwrap();
    out
}

#[test]
fn the_layout_is_the_documented_one() {
    // Built by hand from the table in src/sync/record.rs, big-endian.
    // flags: no ESN flag, legacy state, outbound (0x04 | 0x08), thresholds (0x10)
    let mut want = vec![1u8, 0x04 | 0x08 | 0x10];
    want.extend_from_slice(&132u16.to_be_bytes());
    want.extend_from_slice(&2u16.to_be_bytes());
    want.extend_from_slice(&[50, 0]);
    want.extend_from_slice(&[10, 9, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    want.extend_from_slice(&[10, 9, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    for word in [0xc0ffee01u32, 7, 0xff, 0, 11, 32, 2000, 0] {
        want.extend_from_slice(&word.to_be_bytes());
    }
    for wide in [3u64, 77, 1_796_000_000_000, 2_000_000, 1_000_000, 8_000] {
        want.extend_from_slice(&wide.to_be_bytes());
    }
    for word in [0x1234u32, 0x55, 0xffff_0001] {
        want.extend_from_slice(&word.to_be_bytes());
    }
    assert_eq!(encoded(&legacy_v4()), want);
    assert_eq!(legacy_v4().encoded_len(), want.len());
}

#[test]
fn records_round_trip_and_batch() {
    for record in [legacy_v4(), esn_v6(1), esn_v6(4), esn_v6(128)] {
        let bytes = encoded(&record);
        assert_eq!(bytes.len(), record.encoded_len());
        assert!(bytes.len() <= MAX_RECORD_LEN);
        assert_eq!(SyncRecord::decode(&bytes), Ok(record));
    }
    // A batch: records back to back, each found by its length.
    let mut batch = encoded(&esn_v6(2));
    batch.extend(encoded(&legacy_v4()));
    let (first, used) = SyncRecord::decode_prefix(&batch).unwrap();
    assert_eq!(first, esn_v6(2));
    assert_eq!(SyncRecord::decode(&batch[used..]), Ok(legacy_v4()));
    assert!(SyncRecord::decode(&batch).is_err(), "decode takes exactly one record");
}

/// The golden vectors the fuzzer is seeded with stay what the encoder makes.
#[test]
fn the_seed_records_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/sync-records");
    for (name, record) in [("legacy-v4.bin", legacy_v4()), ("esn-v6.bin", esn_v6(4))] {
        let path = dir.join(name);
        if std::env::var_os("XFRMSYNC_UPDATE_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, encoded(&record)).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(SyncRecord::decode(&bytes), Ok(record), "{name}");
    }
}

fn refused(bytes: &[u8], why: &str) {
    match SyncRecord::decode(bytes) {
        Err(Error::Malformed(_)) => {}
        other => panic!("{why}: {other:?}"),
    }
}

#[test]
fn bad_records_are_refused() {
    let good = encoded(&legacy_v4());
    for cut in 0..good.len() {
        refused(&good[..cut], &format!("cut to {cut} bytes"));
    }
    let mut longer = good.clone();
    longer.push(0);
    refused(&longer, "a byte after it");
    let mut stated_longer = good.clone();
    stated_longer[2..4].copy_from_slice(&136u16.to_be_bytes());
    stated_longer.extend_from_slice(&[0; 4]);
    refused(&stated_longer, "a length beyond its fields");
    let edit = |at: usize, value: u8| {
        let mut bad = good.clone();
        bad[at] = value;
        bad
    };
    refused(&edit(0, 2), "version 2");
    refused(&edit(0, 0), "version 0");
    refused(&edit(1, 0x20 | 0x1c), "an unknown flag");
    refused(&edit(1, 0x08 | 0x10), "outbound without a direction");
    refused(&edit(1, 0x04), "thresholds it does not say it has");
    refused(&edit(5, 7), "family 7");
    refused(&edit(6, 17), "protocol UDP");
    refused(&edit(7, 1), "padding");
    refused(&edit(12, 1), "an IPv4 address longer than 4 bytes");
    refused(&edit(71, 1), "padding after the thresholds");
    let huge = {
        let mut bad = encoded(&esn_v6(1));
        bad[140..144].copy_from_slice(&129u32.to_be_bytes());
        bad
    };
    refused(&huge, "a bitmap of 129 words");
    let window = {
        let mut bad = encoded(&esn_v6(1));
        bad[136..140].copy_from_slice(&33u32.to_be_bytes());
        bad
    };
    refused(&window, "a window larger than its bitmap");
    let mut oversized = vec![1u8, 0x02];
    oversized.extend_from_slice(&(MAX_RECORD_LEN as u16 + 4).to_be_bytes());
    oversized.resize(MAX_RECORD_LEN + 4, 0);
    refused(&oversized, "longer than any record");
    let mixed = SyncRecord { saddr: "2001:db8::1".parse::<IpAddr>().unwrap(), ..legacy_v4() };
    assert!(mixed.encode(&mut Vec::new()).is_err(), "addresses of two families are not encoded");
}

#[test]
fn a_later_record_or_a_higher_epoch_replaces_the_one_held() {
    let held = legacy_v4();
    assert!(SyncRecord { counter: 78, ..held }.supersedes(&held));
    assert!(!SyncRecord { counter: 77, ..held }.supersedes(&held), "the same counter again");
    assert!(!SyncRecord { counter: 76, ..held }.supersedes(&held), "an older record");
    assert!(SyncRecord { epoch: 4, counter: 0, ..held }.supersedes(&held), "a higher epoch restarts counters");
    assert!(!SyncRecord { epoch: 2, counter: 1000, ..held }.supersedes(&held), "a lower epoch never");
}

const NOW: u64 = 1_796_000_000_000;

fn policy() -> MarginPolicy {
    MarginPolicy { detection_ms: 3000, safety_factor: 2.0, floor: 64, ceiling: 1 << 30 }
}

#[test]
fn the_margin_covers_the_rate_over_age_and_detection_plus_the_threshold() {
    // 2,000 packets/s; the record 1 s old at commit; 3 s to detect:
    // 8,000 packets, plus the threshold 32, times 2.
    let record = SyncRecord { sent_at_ms: NOW - 1000, ..legacy_v4() };
    assert_eq!(margin(&record, NOW, &policy()), 2 * (8_000 + 32));
    // An older record needs more.
    let older = SyncRecord { sent_at_ms: NOW - 10_000, ..legacy_v4() };
    assert_eq!(margin(&older, NOW, &policy()), 2 * (26_000 + 32));
    // Floor and ceiling hold.
    let idle = SyncRecord { rate_per_ks: 0, thresholds: None, ..legacy_v4() };
    assert_eq!(margin(&idle, NOW, &policy()), 64);
    let flood = SyncRecord { rate_per_ks: u64::MAX, sent_at_ms: 0, ..legacy_v4() };
    assert_eq!(margin(&flood, NOW, &policy()), 1 << 30);
}

fn local(record: &SyncRecord, replay: Replay, lifetime: (u64, u64)) -> Aevent {
    Aevent {
        sa: record.sa,
        saddr: record.saddr,
        reqid: record.reqid,
        flags: 0,
        replay,
        lifetime: Lifetime { bytes: lifetime.0, packets: lifetime.1, add_time: 100, use_time: 0 },
        replay_threshold: None,
        timer_threshold_ms: None,
        nlmsg_seq: 0,
        nlmsg_pid: 0,
    }
}

fn written(plan: Result<CommitPlan, Mismatch>) -> (Replay, Lifetime, u64) {
    match plan {
        Ok(CommitPlan::Write { update, margin }) => (update.replay.unwrap(), update.lifetime.unwrap(), margin),
        other => panic!("not written: {other:?}"),
    }
}

#[test]
fn outbound_continues_above_the_synced_number_and_never_below_the_local_one() {
    let record = SyncRecord { sent_at_ms: NOW - 1000, ..legacy_v4() };
    let m = margin(&record, NOW, &policy());
    let fresh = local(&record, Replay::Legacy(LegacyReplay { oseq: 0, seq: 0, bitmap: 0 }), (10, 1));
    let (replay, lifetime, used) = written(plan(&record, &fresh, false, None, NOW, &policy(), InboundPolicy::Accept));
    assert_eq!(used, m);
    assert_eq!(replay.oseq64(), 0x1234 + m);
    // 125 bytes a packet on average: the margin's packets counted as sent.
    assert_eq!((lifetime.bytes, lifetime.packets), (1_000_000 + 125 * m, 8_000 + m), "max(local, synced + margin)");
    assert_eq!(lifetime.add_time, 100, "the local SA's install time stays");
    // The standby already sent more than that: its own number stays.
    let ahead = local(&record, Replay::Legacy(LegacyReplay { oseq: 1 << 30, seq: 0, bitmap: 0 }), (1 << 40, 1));
    let (replay, lifetime, _) = written(plan(&record, &ahead, false, None, NOW, &policy(), InboundPolicy::Accept));
    assert_eq!(replay.oseq64(), 1 << 30);
    assert_eq!(lifetime.bytes, 1 << 40);
}

#[test]
fn an_sa_without_esn_is_never_wrapped_and_one_with_esn_crosses_2_32() {
    // Non-ESN, a wide window (ESN-format state, high halves 0), near 2^32.
    let near = |esn: bool| SyncRecord {
        esn,
        direction: Some(Direction::Out),
        replay: Replay::Esn(EsnReplay::new(u32::MAX - 10, 0, 0, 0, 64, &[0, 0]).unwrap()),
        ..esn_v6(2)
    };
    let wide = near(false);
    let fresh = local(&wide, Replay::Esn(EsnReplay::new(0, 0, 0, 0, 64, &[0, 0]).unwrap()), (0, 0));
    match plan(&wide, &fresh, false, None, NOW, &policy(), InboundPolicy::Accept) {
        Ok(CommitPlan::NeedsRekey { next, margin }) => assert_eq!(next, u64::from(u32::MAX - 10) + margin),
        other => panic!("a non-ESN SA past 2^32 must need a rekey: {other:?}"),
    }
    // The same with the ESN flag: 64-bit, across the boundary.
    let esn = near(true);
    let (replay, _, m) = written(plan(&esn, &fresh, true, None, NOW, &policy(), InboundPolicy::Accept));
    assert_eq!(replay.oseq64(), u64::from(u32::MAX - 10) + m);
    let Replay::Esn(r) = replay else { panic!() };
    assert_eq!(r.oseq_hi, 1, "past 2^32 into the high half");
    assert_eq!(r.bitmap().len(), 2, "the local bitmap length is kept");
}

#[test]
fn inbound_accept_continues_and_strict_advances_by_the_margin() {
    let record = SyncRecord { direction: Some(Direction::In), sent_at_ms: NOW - 1000, ..legacy_v4() };
    let behind = local(&record, Replay::Legacy(LegacyReplay { oseq: 0, seq: 0x10, bitmap: 1 }), (0, 0));
    let (replay, _, _) = written(plan(&record, &behind, false, None, NOW, &policy(), InboundPolicy::Accept));
    assert_eq!(replay, Replay::Legacy(LegacyReplay { oseq: 0, seq: 0x55, bitmap: 0xffff_0001 }));
    let (replay, _, m) = written(plan(&record, &behind, false, None, NOW, &policy(), InboundPolicy::Strict));
    assert_eq!(replay, Replay::Legacy(LegacyReplay { oseq: 0, seq: 0x55 + m as u32, bitmap: u32::MAX }));
    // The local SA saw more than the record: it keeps its own window.
    let ahead = local(&record, Replay::Legacy(LegacyReplay { oseq: 0, seq: 0x100, bitmap: 3 }), (0, 0));
    let (replay, _, _) = written(plan(&record, &ahead, false, None, NOW, &policy(), InboundPolicy::Accept));
    assert_eq!(replay, Replay::Legacy(LegacyReplay { oseq: 0, seq: 0x100, bitmap: 3 }));
}

#[test]
fn a_record_for_another_or_unlike_sa_is_not_committed() {
    let record = legacy_v4();
    let other = SyncRecord { sa: SaId::esp("10.9.0.2".parse().unwrap(), 1), ..record };
    let state = local(&other, record.replay, (0, 0));
    assert_eq!(plan(&record, &state, false, None, NOW, &policy(), InboundPolicy::Accept), Err(Mismatch::OtherSa));
    let state = local(&record, record.replay, (0, 0));
    assert_eq!(
        plan(&record, &state, true, None, NOW, &policy(), InboundPolicy::Accept),
        Err(Mismatch::ReplayForm),
        "the local SA has ESN, the record's not"
    );
    let undirected = SyncRecord { direction: None, ..record };
    assert_eq!(
        plan(&undirected, &state, false, None, NOW, &policy(), InboundPolicy::Accept),
        Err(Mismatch::NoDirection)
    );
    assert!(plan(&undirected, &state, false, Some(Direction::Out), NOW, &policy(), InboundPolicy::Accept).is_ok());
}

#[test]
fn a_departure_round_trips_and_a_bad_one_builds_nothing() {
    use xfrmsync::sync::{Departure, DEPARTURE_LEN};
    let v6 = SaId::esp("fd00:9::2".parse().unwrap(), 0x3001).with_mark(7, 0xff).with_if_id(5);
    for sa in [SaId::esp("10.9.0.2".parse().unwrap(), 0x1001), v6] {
        let departure = Departure { sa, epoch: 9 };
        let mut bytes = Vec::new();
        departure.encode(&mut bytes);
        assert_eq!(bytes.len(), DEPARTURE_LEN);
        assert_eq!(Departure::decode_prefix(&bytes).unwrap(), (departure, DEPARTURE_LEN));
        assert!(Departure::decode_prefix(&bytes[..DEPARTURE_LEN - 1]).is_err(), "cut short");
        for (at, value) in [(0, 2), (1, 1), (3, 40), (5, 3), (6, 17), (7, 1)] {
            let mut bad = bytes.clone();
            bad[at] = value;
            assert!(Departure::decode_prefix(&bad).is_err(), "byte {at} = {value} taken");
        }
    }
}
